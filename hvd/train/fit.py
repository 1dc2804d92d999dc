"""The whole training chain, as `pipelines/train.py` runs it: warm start -> benchmark -> shards -> train."""

from __future__ import annotations

from hvd.config import Config
from hvd.train.preflight import check_inputs
from hvd.train.trainer import TrainOutcome, prepare_data, train
from hvd.train.warm_start import provenance, warm_start


def fit(cfg: Config, tags: dict[str, str] | None = None) -> TrainOutcome:
    """Train `cfg` end to end; the synthetic warm start and the prepared shards are made once and reused.
    `tags` go on the MLflow run (e.g. a parent run's id)."""
    check_inputs(cfg)
    cfg = warm_start(cfg)
    return train(cfg, prepare_data(cfg), tags={**provenance(cfg), **(tags or {})})
