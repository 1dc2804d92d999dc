"""Where the model under evaluation comes from: the MLflow registry, a run, or a checkpoint on disk.

Whatever the source, the result is the same three things: the model, the config it was trained with
(its `model` and `data` sections say how to build it and how its frames were sampled), and the
identity (name, version, source run) that the evaluation run is tagged with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient

from hvd.checkpoint import STATE_FILE, load_state
from hvd.config import Config, config_from_yaml
from hvd.model import RetrievalModel, rebuild_model
from hvd.registry.flavor import ModelFormatError
from hvd.registry.model_uri import ModelSourceError, check_model_uri
from hvd.registry.models import load_model, version_model_id


@dataclass(frozen=True)
class ModelSource:
    uri: str
    name: str  # registered model name; the folder name for a checkpoint
    version: str  # registry version; "run" for runs:/ URIs, "checkpoint" for a directory
    source_run: str  # the training run's MLflow id, "" when unknown (a bare checkpoint)
    model_id: str | None = None  # MLflow's logged model of a registry version: eval metrics also go on it

    @property
    def label(self) -> str:
        return f"{self.name}-v{self.version}" if self.version.isdigit() else f"{self.name}-{self.version}"

    def tags(self) -> dict[str, str]:
        """The MLflow tags by which a job's run (evaluation, index, search) names the model it used."""
        return {"model_uri": self.uri, "model_name": self.name, "model_version": self.version,
                "source_run": self.source_run}


def load_model_source(uri: str) -> tuple[RetrievalModel, Config, ModelSource]:
    """Load the model behind `uri` (see `hvd.registry.model_uri.URI_FORMS`) on the CPU, in eval mode."""
    check_model_uri(uri)
    return _load_logged(uri) if uri.startswith(("models:/", "runs:/")) else _load_checkpoint(Path(uri))


def _load_logged(uri: str) -> tuple[RetrievalModel, Config, ModelSource]:
    try:
        model, cfg = load_model(uri)
        model_id = None
        if uri.startswith("models:/"):
            name, version = get_model_name_and_version(MlflowClient(), uri)
            registered = MlflowClient().get_model_version(name, version)
            source_run, model_id = registered.run_id or "", version_model_id(registered)
        else:
            source_run = uri.removeprefix("runs:/").split("/", 1)[0]
            name, version = cfg.tracking.model_name, "run"
    except ModelFormatError as err:
        raise ModelSourceError(f"--model {err}") from None
    except mlflow.exceptions.MlflowException as err:
        raise ModelSourceError(
            f"--model {uri!r}: cannot load it from {mlflow.get_tracking_uri()}: {err.message.splitlines()[0]}"
        ) from None
    return model, cfg, ModelSource(uri, name, str(version), source_run, model_id)


def _load_checkpoint(directory: Path) -> tuple[RetrievalModel, Config, ModelSource]:
    """A Ray Train checkpoint folder (`state.pt` with the model weights and the config YAML)."""
    if not (directory / STATE_FILE).is_file():
        raise ModelSourceError(
            f"--model {directory}: no {STATE_FILE} in this folder (a Ray Train checkpoint has one)"
        )
    state = load_state(directory)
    cfg = config_from_yaml(state["config_yaml"])
    return rebuild_model(cfg.model, state["model"]), cfg, ModelSource(str(directory), directory.name, "checkpoint", "")
