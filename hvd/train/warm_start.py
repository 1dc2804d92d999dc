"""The synthetic warm start: the preset's CLIP trained image-text on captioned stills, once per config.

Real users start from CLIP weights pretrained on images; `model.pretrained=synthetic` gives the synthetic
world the same start. Stills of that world (`hvd.data.stills`) are one-frame videos, and the mean-pooling
head on one frame is CLIP's own image-text loss, so the warm start trains through the same Ray Train loop,
MLflow run and registry as video training (experiment `pretrain`, model `clip-<preset>-synthetic`). Its
backbone is written as an open_clip state dict (safetensors) that `model.pretrained=PATH` loads like any
CLIP checkpoint, named by the fingerprint of everything that decides it, so a later run reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from hvd.config import WARM_START, Config, ModelConfig, SyntheticConfig
from hvd.data.folders import exclusive
from hvd.data.stills import digest, stills_identity, write_stills
from hvd.data.synthetic import Settings, resolve
from hvd.model import save_weights
from hvd.model.presets import preset_config
from hvd.runtime.cluster import ensure_ray
from hvd.runtime.durable import write_text
from hvd.runtime.paths import require_shared_paths
from hvd.train.trainer import TrainingData, train

logger = logging.getLogger(__name__)

EXPERIMENT = "pretrain"


def stills_plan(cfg: Config) -> tuple[Settings, dict[str, int]]:
    """The stills' world (the benchmark's objects and clutter at the preset's image size; target sizes vary, see
    `hvd.data.stills`) and split sizes."""
    size = int(preset_config(cfg.model.preset, cfg.model.quick_gelu)["vision_cfg"]["image_size"])
    settings = Settings(
        seed=cfg.synthetic.seed, num_train=0, num_val=0, num_test=0, frame_size=size, fps=resolve(cfg.synthetic).fps,
        duration_s=1.0, event_fraction=1.0, entity_scale=0.0,
        num_distractors=cfg.synthetic.num_distractors, train_captions=1,
    )
    return settings, {"train": cfg.pretrain.train_stills, "val": cfg.pretrain.val_stills}


def warm_start_fingerprint(cfg: Config) -> str:
    """Everything that decides the warm start's weights: the stills (`synthetic.seed` draws them) and the
    recipe (`pretrain.seed` seeds the initialisation and batch order)."""
    settings, counts = stills_plan(cfg)
    recipe = {k: v for k, v in dataclasses.asdict(cfg.pretrain).items() if k != "out"}
    return digest({
        "stills": stills_identity(settings, counts), "recipe": recipe,
        "model": preset_config(cfg.model.preset, cfg.model.quick_gelu), "max_words": cfg.data.max_words,
        "workers": cfg.train.num_workers, "grad_clip": cfg.train.grad_clip, "weight_decay": cfg.train.weight_decay,
        "warmup_fraction": cfg.train.warmup_fraction,
    })


def model_name(cfg: Config) -> str:
    return f"clip-{cfg.model.preset.lower()}-synthetic"


def pretrain_config(cfg: Config, fingerprint: str, stills: Path) -> Config:
    """The video config turned into the warm start's: one-frame stills, the mean-pooling head, the recipe of
    `pretrain.*`, its own run name, experiment and registered model."""
    return dataclasses.replace(
        cfg,
        # Seeded by pretrain.seed, whatever run.seed: seeds of a fine-tuning share one warm start, as runs
        # starting from CLIP share CLIP's weights; the study gives each seed its own (hvd.train.study).
        run=dataclasses.replace(cfg.run, name=f"{model_name(cfg)}-{fingerprint[:8]}", seed=cfg.pretrain.seed),
        # Of the video config's world and model, only what decides the stills and the weights: runs that share
        # this warm start (two studies' trials of one seed) differ in a benchmark's folder or a head's knobs, which
        # must not stop one of them resuming the warm start another left unfinished.
        synthetic=SyntheticConfig(preset=cfg.synthetic.preset, seed=cfg.synthetic.seed, fps=cfg.synthetic.fps,
                                  num_distractors=cfg.synthetic.num_distractors),
        data=dataclasses.replace(cfg.data, manifest=None, shards=str(stills), num_frames=1, expand_captions=False,
                                 augment="none"),
        model=ModelConfig(preset=cfg.model.preset, quick_gelu=cfg.model.quick_gelu, head="meanp",
                          score_budget_mb=cfg.model.score_budget_mb),
        train=dataclasses.replace(cfg.train, epochs=cfg.pretrain.epochs, batch_size=cfg.pretrain.batch_size,
                                  lr=cfg.pretrain.lr, fail_at_step=-1),
        tracking=dataclasses.replace(cfg.tracking, experiment=EXPERIMENT, model_name=model_name(cfg)),
    )


def warm_start_stills(cfg: Config) -> Path:
    """The warm start's stills as shards under `pretrain.out`, written unless already there."""
    settings, counts = stills_plan(cfg)
    out = Path(cfg.pretrain.out) / f"stills-{digest(stills_identity(settings, counts))}"
    return write_stills(settings, counts, out, workers=cfg.synthetic.workers)


def pretrain(cfg: Config) -> Path:
    """The warm start's weights file for `cfg`, trained now unless a run with the same fingerprint made it. Runs
    that start together train it once: the others wait on its lock, then find the file."""
    fingerprint = warm_start_fingerprint(cfg)
    out = Path(cfg.pretrain.out)
    weights = out / f"{model_name(cfg)}-{fingerprint}.safetensors"
    record = weights.with_suffix(".json")
    with exclusive(weights, "warm start"):
        if weights.is_file() and record.is_file():
            logger.info(f"warm start      {weights} (cached: {json.loads(record.read_text())['model_uri']})")
            return weights
        ensure_ray()
        require_shared_paths({"pretrain.out": out})
        settings, counts = stills_plan(cfg)
        stills = warm_start_stills(cfg)
        run_cfg = pretrain_config(cfg, fingerprint, stills)
        logger.info(f"warm start      training {model_name(cfg)} on {counts['train']} captioned stills "
                    f"({cfg.pretrain.epochs} epochs)")
        data = TrainingData(stills, f"synthetic-stills-{settings.frame_size}px", fingerprint, str(stills))
        outcome = train(run_cfg, data)
        save_weights(outcome.network, weights)
        model_uri = f"models:/{outcome.model.name}/{outcome.model.version}"
        write_text(record, json.dumps({"model_uri": model_uri, "run_id": outcome.run_id, "val": outcome.val},
                                      indent=2) + "\n")
    r1 = outcome.val.get("t2v/R1", float("nan"))
    logger.info(f"warm start      {weights} ({model_uri}: val stills t2i R@1 {r1:.1f})")
    return weights


def provenance(cfg: Config) -> dict[str, str]:
    """MLflow tags naming the warm start a resolved config's weights came from; empty for other weights."""
    record = Path(cfg.model.pretrained).with_suffix(".json") if cfg.model.pretrained else None
    if record is None or not record.is_file():
        return {}
    return {"warm_start": json.loads(record.read_text())["model_uri"]}


def warm_start(cfg: Config) -> Config:
    """`cfg` with `model.pretrained=synthetic` replaced by the warm start's file; any other config as it is."""
    if cfg.model.pretrained != WARM_START:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(pretrain(cfg))))
