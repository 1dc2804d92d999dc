"""The forms a model URI takes, checked without MLflow or torch, so a command refuses a wrong one in a second."""

from __future__ import annotations

from pathlib import Path

from hvd.errors import InputError

URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint directory"


class ModelSourceError(InputError, ValueError):
    """A model URI that names nothing loadable; the message names the URI."""


def check_model_uri(uri: str) -> None:
    """Refuse `uri` unless it is a registry or run URI (their targets are checked when loaded) or a directory."""
    if not (uri.startswith(("models:/", "runs:/")) or Path(uri).is_dir()):
        raise ModelSourceError(f"--model {uri!r}: not a model URI nor a directory (use one of: {URI_FORMS})")
