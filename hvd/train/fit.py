"""The whole training chain, as `pipelines/train.py` runs it: warm start -> benchmark -> shards -> train."""

from __future__ import annotations

from pathlib import Path

from hvd.config import WARM_START, Config, ConfigError
from hvd.data.manifest import index_manifest
from hvd.model import check_inputs as check_model_inputs
from hvd.train.trainer import TrainOutcome, prepare_data, train
from hvd.train.warm_start import provenance, warm_start


def fit(cfg: Config, tags: dict[str, str] | None = None) -> TrainOutcome:
    """Train `cfg` end to end; the synthetic warm start and the prepared shards are made once and reused.
    `tags` go on the MLflow run (e.g. a parent run's id)."""
    check_inputs(cfg)
    cfg = warm_start(cfg)
    return train(cfg, prepare_data(cfg), tags={**provenance(cfg), **(tags or {})})


def check_inputs(cfg: Config) -> None:
    """What a run reads, checked before Ray, MLflow or the warm start spend minutes: settings the model cannot
    take, a broken manifest (naming its line), a missing weights file."""
    check_model_inputs(cfg.model, cfg.data)
    if cfg.data.manifest:
        index_manifest(cfg.data.manifest)
    if cfg.model.pretrained not in (None, WARM_START) and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f"model.pretrained: no such file: {cfg.model.pretrained}")
