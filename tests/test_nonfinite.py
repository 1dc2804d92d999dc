"""A diverged model never reads as a good one: non-finite steps are skipped and counted, a run that keeps
diverging stops, and NaN weights are never registered."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from hvd.config import ModelConfig, TrainConfig, load_config
from hvd.model import build_model, build_tokenizer
from hvd.registry.models import NonFiniteModel, register_model
from hvd.registry.runs import start_or_resume_run, tracking_uri
from hvd.train.loop import NonFiniteTraining, Worker, WorkerPlan
from hvd.train.optim import build_optimizer, build_scheduler
from hvd.train.step import train_step

CAPTIONS = ["a red square slides left", "a blue circle grows", "two green dots swap", "a yellow bar spins"]


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (len(CAPTIONS), 4, 64, 64, 3), generator=generator, dtype=torch.uint8)
    return {"tokens": build_tokenizer(ModelConfig(), 32)(CAPTIONS), "frames": frames,
            "frame_mask": torch.ones(len(CAPTIONS), 4, dtype=torch.bool)}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_as_they_were():
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    optimizer = build_optimizer(model, TrainConfig(), ModelConfig())
    scheduler = build_scheduler(optimizer, TrainConfig(warmup_fraction=0.0), 4)
    with torch.no_grad():
        model.backbone.clip.logit_scale.fill_(float("nan"))  # the loss, and every gradient, become NaN
    before = weights(model)
    loss, parts, stepped = train_step(model, optimizer, scheduler, batch(), grad_clip=1.0)
    assert not stepped and math.isnan(loss.item()) and not math.isfinite(parts["grad_norm"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) or name.endswith("logit_scale"), name
    assert all(p.grad is None for p in model.parameters())  # nothing left over for the next step

    with torch.no_grad():
        model.backbone.clip.logit_scale.fill_(math.log(1 / 0.07))
    loss, parts, stepped = train_step(model, optimizer, scheduler, batch(), grad_clip=1.0)
    assert stepped and math.isfinite(loss.item()) and math.isfinite(parts["grad_norm"])
    assert any(not torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_the_run_stops_after_max_skipped_steps_in_a_row(capsys):
    cfg = load_config(None, ["train.max_skipped_steps=3"])
    plan = WorkerPlan(cfg, "run", "sqlite:///unused.db", "shards", "val", steps_per_epoch=10, fault_marker="x")
    worker = Worker(plan, rank=0, world=1, device=torch.device("cpu"), model=None, optimizer=None, scheduler=None)
    for _ in range(2):
        worker.count_step(False, float("nan"), float("nan"))
    worker.count_step(True, 1.0, 0.5)  # a good step resets the streak, not the total
    assert (worker.skipped_in_a_row, worker.skipped_steps) == (0, 2)
    worker.count_step(False, float("inf"), float("nan"))
    worker.count_step(False, float("nan"), float("nan"))
    with pytest.raises(NonFiniteTraining, match="3 steps in a row"):
        worker.count_step(False, float("nan"), float("nan"))
    assert worker.skipped_steps == 5
    assert "step skipped (2 in a row, 4 in all" in capsys.readouterr().out


def test_a_model_with_nan_weights_is_never_registered(tmp_path):
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "model.pretrained=null",
                             f"train.storage_path={tmp_path}/ray"])
    model = build_model(cfg.model)
    with torch.no_grad():
        next(model.head.parameters()).fill_(float("nan"))
    run = start_or_resume_run(cfg, {})
    with pytest.raises(NonFiniteModel, match="not registered: 1 weight tensor"):
        register_model(cfg, run.run_id, model, {"val/t2v/R1": 100.0})
    with pytest.raises(NonFiniteModel, match="val/t2v/R1"):
        register_model(cfg, run.run_id, build_model(cfg.model), {"val/t2v/R1": float("nan")})
    assert MlflowClient(tracking_uri(cfg)).search_registered_models() == []
