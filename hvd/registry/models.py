"""Registered models: a trained model logged in the safe flavor, versioned, and `champion` when it wins.

`models:/NAME@latest` needs no alias of ours: MLflow reserves `latest` and resolves it to the newest version.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient

from hvd.config import Config
from hvd.errors import HvdError
from hvd.registry import flavor
from hvd.registry.runs import active_tracking_uri, command_line, run_url, tracking_uri
from hvd.runtime.worker_setup import verbose

CHAMPION_METRIC = "val/t2v/R1"
SCORED_ON_TAG = "scored_on"  # benchmark@fingerprint/split the version's metrics were measured on

logger = logging.getLogger(__name__)


class NonFiniteModel(HvdError, ValueError):
    """Weights or metrics with NaN or infinity: such a model is never registered."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    model_id: str  # MLflow's logged model: metrics logged with it show on the model's page
    champion: bool  # the `champion` alias moved to this version


def register_model(
    cfg: Config, run_id: str, model: Any, metrics: dict[str, float], scored_on: str = "",
    test: dict[str, float] | None = None,
) -> RegisteredModel:
    """Log `model` to the run, register a new version, describe it, and point `champion` at it if it wins.

    `scored_on` names what `metrics` were measured on (benchmark, its fingerprint and split: `scored_on`):
    the champion moves only to a version that beats it on the same data, never across benchmarks, whose
    numbers do not compare (a synthetic model's R@1 60 says nothing against an MSR-VTT model's 45).

    `metrics` (the chosen checkpoint's validation numbers) go on the version as tags; `test` (its test
    metrics, `t2v/R1` ...) into the version's description (`version_description`). A model with NaN or
    infinite weights, or metrics, is refused: it must never become a version, let alone `champion`.
    """
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    broken += [key for key, value in metrics.items() if not math.isfinite(value)]
    if broken:
        raise NonFiniteModel(f"not registered: {len(broken)} weight tensor(s) or metric(s) hold NaN or infinity "
                             f"({', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''})")
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    name = cfg.tracking.model_name
    # MLflow prints "Successfully registered ..." and "Created version ..." itself; the summary says so.
    quiet = contextlib.nullcontext() if verbose() else contextlib.redirect_stderr(io.StringIO())
    with active_tracking_uri(uri), mlflow.start_run(run_id=run_id), quiet:
        info = flavor.log_model(model.cpu(), cfg, registered_model_name=name)
    version = str(info.registered_model_version)
    score = metrics.get(CHAMPION_METRIC)
    tags = {"source_run": run_id, "head": cfg.model.head, "preset": cfg.model.preset, SCORED_ON_TAG: scored_on}
    tags |= {key: f"{value:.4f}" for key, value in metrics.items()}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    link = run_url(uri, client.get_run(run_id).info.experiment_id, run_id)
    client.update_model_version(name, version, description=version_description(cfg, scored_on, test or {}, run_id, link))
    is_champion = _wins(client, name, score, scored_on)
    if is_champion:
        client.set_registered_model_alias(name, "champion", version)
    return RegisteredModel(name, version, info.model_id, is_champion)


def version_description(cfg: Config, scored_on: str, test: dict[str, float], run_id: str, run_link: str) -> str:
    """The version page's description (Markdown), readable without the tags: which head on which backbone,
    the benchmark it was chosen on (`scored_on`), its test R@1 both ways, the command that trained it, its run."""
    benchmark = scored_on.partition("@")[0] or "an unrecorded benchmark"
    recall = (f"text-to-video **{test['t2v/R1']:.1f}**, video-to-text **{test['v2t/R1']:.1f}**"
              if "t2v/R1" in test else "not measured (no test split)")
    return "\n\n".join([
        f"**{cfg.model.head}** head on **{cfg.model.preset}** CLIP, trained on **{benchmark}**"
        + (f" (chosen on `{scored_on}`)." if scored_on else "."),
        f"Test R@1: {recall}.",
        f"Command: `{command_line()}`",
        f"Training run: [{run_id}]({run_link})",
    ])


def scored_on(benchmark: str, fingerprint: str, split: str) -> str:
    """What a version's metrics were measured on, as its `scored_on` tag: `msrvtt@1a2b3c4d5e6f/val`."""
    return f"{benchmark}@{fingerprint[:12]}/{split}"


def version_model_id(version: Any) -> str | None:
    """The logged model behind a registry version: its `model_id`, which SQLite stores leave empty, else
    the `models:/m-...` source it was registered from."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _wins(client: MlflowClient, name: str, score: float | None, data: str) -> bool:
    """Whether a new version scoring `score` on `data` takes `champion`: always when there is none; never from a
    champion scored on other data (a version from before the tag counts as the same data)."""
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        return True
    if champion.tags.get(SCORED_ON_TAG, data) != data:
        logger.warning(f"{name}: champion stays version {champion.version}, scored on "
                       f"{champion.tags[SCORED_ON_TAG] or 'unrecorded data'}, not on {data or 'unrecorded data'}: "
                       "register each benchmark under its own tracking.model_name")
        return False
    value = champion.tags.get(CHAMPION_METRIC)
    return score is not None and score > (float(value) if value is not None else float("-inf"))


def load_model(model_uri: str, uri: str | None = None) -> tuple[Any, Config]:
    """A registered or logged model (`models:/hvd@champion`, `models:/hvd/3`, `runs:/...`) and its config,
    from the tracking store `uri` (default: MLflow's current one). Only the hvd flavor loads: see
    `hvd.registry.flavor`, which never unpickles."""
    with active_tracking_uri(uri) if uri else contextlib.nullcontext():
        return flavor.load_model(model_uri)
