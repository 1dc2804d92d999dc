"""AdamW with a backbone and a new-module learning rate, and the warmup-cosine schedule (CLIP4Clip's settings).

A pretrained CLIP backbone moves slowly (`train.backbone_lr`, 1e-7) while the head learns at
`train.lr`; a backbone trained from scratch (no `model.pretrained`, as for the tiny preset) learns at
`train.lr` too. Biases, norms, embeddings-as-vectors and the logit scale take no weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from hvd.config import ModelConfig, TrainConfig

BETAS = (0.9, 0.98)
EPS = 1e-6


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, model_cfg: ModelConfig) -> torch.optim.AdamW:
    """AdamW over named groups: backbone / head, each with and without weight decay."""
    backbone_lr = train_cfg.lr if model_cfg.pretrained is None else train_cfg.backbone_lr
    groups = []
    for part, lr in (("backbone", backbone_lr), ("head", train_cfg.lr)):
        parameters = [p for p in getattr(model, part).parameters() if p.requires_grad]
        for suffix, decay, members in (
            ("", train_cfg.weight_decay, [p for p in parameters if p.ndim >= 2]),
            ("_no_decay", 0.0, [p for p in parameters if p.ndim < 2]),
        ):
            if members:
                groups.append({"name": part + suffix, "params": members, "lr": lr, "weight_decay": decay})
    return torch.optim.AdamW(groups, betas=BETAS, eps=EPS)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """Linear warmup over `warmup_fraction` of the steps, then a cosine decay to zero at `total_steps`."""
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one step, got total_steps={total_steps}")
    warmup = round(train_cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
