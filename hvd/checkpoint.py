"""Training state on disk: everything a restarted worker group needs to continue at the right step.

Saved with `torch.save` and read back with `weights_only=True`: only tensors and plain Python values,
so a checkpoint can never run code when it is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hvd.runtime.durable import atomic_file

STATE_FILE = "state.pt"


def save_state(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    epoch: int,
    best_score: float,
    config_yaml: str,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """`epoch` is the epoch in progress (finished epochs when saved at an epoch's end); fp16's `grad_scaler`
    keeps its scale across a restart. The file is whole and on disk before it has its name (`hvd.runtime.durable`)."""
    path = Path(directory) / STATE_FILE
    with atomic_file(path) as partial:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "best_score": best_score,
                "torch_rng": torch.get_rng_state(),
                "config_yaml": config_yaml,
                **({"grad_scaler": grad_scaler.state_dict()} if grad_scaler is not None else {}),
            },
            partial,
        )
    return path


def load_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)
