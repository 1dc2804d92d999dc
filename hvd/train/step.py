"""One optimisation step and the CUDA settings it runs under: the math of training, without Ray or MLflow.

Kept apart from `hvd.train.loop` (the Ray Train worker) so that benchmarks and tests drive the production step
on any machine that has torch and open_clip, a bare GPU node included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hvd.train.gradients import average_across_ranks, cached_gradient_backward

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # train.precision -> CUDA autocast


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: dict[str, Tensor],
    grad_clip: float,
    micro_batch: int = 0,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, dict[str, float], bool]:
    """One optimisation step on a `TrainingCollate` batch; `model` is the DDP-wrapped model when there are
    several workers and no `micro_batch` (hvd.train.gradients: a micro-batched model is bare and its gradients
    are averaged there). Returns the loss, its parts (and the gradient norm) and whether the step was sound: a
    step whose loss or gradient norm is not finite is skipped, so one bad batch never writes NaN weights. The
    norm is of the all-reduced gradients, so every rank skips the same steps. With fp16's `scaler`, an overflowing
    gradient of a finite loss is the scaler's to handle (it skips the step and lowers the scale): sound."""
    optimizer.zero_grad(set_to_none=True)
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    if micro_batch:
        loss, parts = cached_gradient_backward(model, batch, micro_batch, scale)
        average_across_ranks(model)
    else:
        loss, parts = model(batch["tokens"], batch["frames"], batch["frame_mask"])
        scale(loss).backward()  # DDP all-reduces gradient buckets while the rest of backward runs
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    loss_value, norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one device sync
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the gradient overflowed
        scaler.update()
        parts = {**parts, "grad_scale": scaler.get_scale()}
        sound = math.isfinite(loss_value)
    else:
        sound = math.isfinite(loss_value) and math.isfinite(norm)
        if sound:
            optimizer.step()
    if not sound:
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()  # the schedule follows the step count, skipped steps included
    return loss.detach(), {**parts, "grad_norm": norm}, sound


def use_fast_cuda_math() -> None:
    """TF32 tensor cores for the fp32 matmuls left outside autocast (the loss, the optimizer; fp32 training)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
