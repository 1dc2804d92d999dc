"""Optimizer parameter groups and the warmup-cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from hvd.config import ModelConfig, TrainConfig
from hvd.model import build_model, save_weights
from hvd.train.optim import build_optimizer, build_scheduler


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig())


def test_groups_cover_every_parameter_once_with_the_right_rates(model, tmp_path):
    train = TrainConfig(lr=1e-4, backbone_lr=1e-7, weight_decay=0.2)
    optimizer = build_optimizer(model, train, ModelConfig())
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # not the fixed positions
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert all(
        group["lr"] == 1e-4 for group in groups.values()
    )  # no pretrained weights: backbone learns as fast
    assert groups["backbone"]["weight_decay"] == 0.2 and groups["head_no_decay"]["weight_decay"] == 0.0
    assert any(p is model.backbone.logit_scale for p in groups["backbone_no_decay"]["params"])

    pretrained = save_weights(model, tmp_path / "clip.safetensors")
    optimizer = build_optimizer(model, train, ModelConfig(pretrained=str(pretrained)))
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"backbone": 1e-7, "backbone_no_decay": 1e-7, "head": 1e-4, "head_no_decay": 1e-4}


def test_meanp_has_only_backbone_groups():
    torch.manual_seed(0)
    optimizer = build_optimizer(
        build_model(ModelConfig(head="meanp")), TrainConfig(), ModelConfig(head="meanp")
    )
    assert {group["name"] for group in optimizer.param_groups} == {"backbone", "backbone_no_decay"}


def test_warmup_then_cosine_to_zero(model):
    train = TrainConfig(lr=1e-3, warmup_fraction=0.1)
    optimizer = build_optimizer(model, train, ModelConfig())
    scheduler = build_scheduler(optimizer, train, total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-4)  # first of 10 warmup steps
    assert all(a < b for a, b in zip(rates[:10], rates[1:10], strict=False))
    assert rates[9] == pytest.approx(1e-3) and rates[10] == pytest.approx(1e-3)
    assert rates[55] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False)) and rates[-1] < 1e-5


def test_bad_schedules_are_errors(model):
    optimizer = build_optimizer(model, TrainConfig(), ModelConfig())
    with pytest.raises(ValueError, match="total_steps=0"):
        build_scheduler(optimizer, TrainConfig(), 0)
    # warmup_fraction out of range is the config's to refuse, at load: tests/test_config.py
