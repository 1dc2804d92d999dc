"""Turn a Ray Data batch of shard rows into the model's training input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from hvd.eval.encode import frames_tensor

ROW_COLUMNS = ("video_id", "frames", "frame_codec", "frame_size")


def pick_captions(captions: np.ndarray, generator: torch.Generator) -> list[str]:
    """One caption per video, drawn at random: CLIP4Clip's default, a fresh draw every epoch."""
    return [str(c[int(torch.randint(len(c), (1,), generator=generator))]) for c in captions]


def training_batch(
    batch: dict[str, np.ndarray], tokenizer: Callable[[list[str]], Tensor], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(tokens [B, L], frames [B, T, 3, H, W]) from a numpy batch of shard rows."""
    rows = [{key: batch[key][i] for key in ROW_COLUMNS} for i in range(len(batch["video_id"]))]
    return tokenizer(pick_captions(batch["captions"], generator)), frames_tensor(rows)
