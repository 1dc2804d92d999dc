"""The memory-saving ways to train (hvd.train.gradients, train.grad_checkpointing, fp16's gradient scaler) take the
same step as the plain one, or skip it as they should; their keys refuse what cannot work."""

from __future__ import annotations

import pytest
import torch

from hvd.config import ConfigError, ModelConfig, TrainConfig, load_config
from hvd.model import build_model, build_tokenizer
from hvd.train.gradients import cached_gradient_backward
from hvd.train.optim import build_optimizer, build_scheduler
from hvd.train.step import train_step

CAPTIONS = ["a red square slides left", "a blue circle grows", "two green dots swap", "a yellow bar spins",
            "a white cross falls", "a small red dot waits"]


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (len(CAPTIONS), 4, 64, 64, 3), generator=generator, dtype=torch.uint8)
    mask = torch.arange(4) < torch.tensor([[4], [2], [4], [3], [1], [4]])  # padded clips among them
    return {"tokens": build_tokenizer(ModelConfig(), 32)(CAPTIONS), "frames": frames, "frame_mask": mask}


def gradients(head: str, micro_batch: int = 0, checkpointing: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(head=head))
    model.backbone.checkpoint_vision(checkpointing)
    inputs = batch()
    if micro_batch:
        loss, _ = cached_gradient_backward(model, inputs, micro_batch, lambda loss: loss)
    else:
        loss, _ = model(inputs["tokens"], inputs["frames"], inputs["frame_mask"])
        loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same(expected: tuple[float, dict[str, torch.Tensor]], got: tuple[float, dict[str, torch.Tensor]]) -> None:
    assert got[0] == pytest.approx(expected[0], rel=1e-6)
    assert got[1].keys() == expected[1].keys()
    floor = 1e-7 * torch.stack([g.norm() for g in expected[1].values()]).norm()  # summation order, as DDP's test
    for name, grad in expected[1].items():
        assert (got[1][name] - grad).norm() <= 1e-5 * grad.norm() + floor, name


@pytest.mark.parametrize("head", ["hvd", "hcmi"])  # every head, on two ranks: tests/test_model_distributed.py
def test_cached_feature_gradients_give_the_whole_batchs_loss_and_gradient(head):
    assert_same(gradients(head), gradients(head, micro_batch=4))  # micro-batches of 4 and 2, entities padded


def test_vision_checkpointing_changes_memory_not_the_gradient():
    assert_same(gradients("hvd"), gradients("hvd", checkpointing=True))


def test_an_overflowing_scaled_gradient_is_skipped_by_the_scaler_not_counted_as_divergence():
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    optimizer = build_optimizer(model, TrainConfig(), ModelConfig())
    scheduler = build_scheduler(optimizer, TrainConfig(warmup_fraction=0.0), 4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))  # every scaled gradient overflows
    loss, parts, sound = train_step(model, optimizer, scheduler, batch(), grad_clip=1.0, scaler=scaler)
    assert sound and torch.isfinite(loss) and not torch.isfinite(torch.tensor(parts["grad_norm"]))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # the scaler skipped it
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss, parts, sound = train_step(model, optimizer, scheduler, batch(), grad_clip=1.0, scaler=scaler)
    assert sound and parts["grad_scale"] == 1024.0 and torch.isfinite(torch.tensor(parts["grad_norm"]))
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_keys_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match="train.micro_batch_size.*below each worker's batch"):
        load_config(None, ["train.batch_size=8", "train.num_workers=2", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp8"])
    assert load_config(None, ["train.micro_batch_size=3", "train.precision=fp16"]).train.micro_batch_size == 3
