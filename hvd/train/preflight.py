"""What a training run reads, checked in a second, before Ray, MLflow or the warm start spend minutes.

Imports neither torch, Ray nor MLflow, so `pipelines/train.py` answers bad input before its job's imports.
"""

from __future__ import annotations

from pathlib import Path

from hvd.config import WARM_START, Config, ConfigError
from hvd.data.manifest import index_manifest
from hvd.model.presets import check_inputs as check_model_inputs


def check_inputs(cfg: Config) -> None:
    """Settings the model cannot take, a broken manifest (naming its line), a missing weights file."""
    check_model_inputs(cfg.model, cfg.data)
    if cfg.data.manifest:
        index_manifest(cfg.data.manifest)
    if cfg.model.pretrained not in (None, WARM_START) and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f"model.pretrained: no such file: {cfg.model.pretrained}")
