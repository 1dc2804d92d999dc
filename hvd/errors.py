"""The project's one error base: a message that names what went wrong and what to do about it.

Pipelines print an `HvdError` as one line (`hvd.cli.fail`), never a traceback, and exit with its
`exit_code`: 2 for bad input (`InputError`: a config value, a manifest, shards, a model URI, a path, a
weights file), 1 for a run that could not finish (training failed, a broken model refused). Each family
also keeps its built-in base (`ValueError`, `RuntimeError`), so code that catches those still does.
"""

from __future__ import annotations


class HvdError(Exception):
    """A failure whose message says what happened and what to do; a pipeline exits 1 with it."""

    exit_code = 1


class InputError(HvdError):
    """Input the user gave that cannot be used; the message names the input, and a pipeline exits 2."""

    exit_code = 2
