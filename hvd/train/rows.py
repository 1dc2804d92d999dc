"""Shard rows -> training arrays, the work of Ray Data's CPU tasks: frames decoded (and augmented), captions carried.

Ray Data imports this module in every process that holds the training dataset's plan (Ray Train's dataset
manager, the split coordinator, each decode task's worker), so it imports neither torch nor open_clip at its
top: torch only where a clip is augmented, and captions are tokenised in the training worker
(`hvd.train.inputs.TrainingCollate`), which has the tokenizer loaded already. Each of those imports costs a
process seconds, and Ray Train starts them one after another before the first step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from hvd.data.shards import frame_mask, frames_uint8


@functools.lru_cache(maxsize=4)
def _augmentation(kind: str, size: int) -> Callable[[Any], Any]:
    from torchvision.transforms import v2

    if kind == "crop_flip":  # X-Pool's training transform
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    return v2.RandAugment(num_ops=2, magnitude=9)


def augment_clip(frames: np.ndarray, kind: str) -> np.ndarray:
    """[T, H, W, 3] uint8 frames of one clip, augmented with one random draw for the whole clip (`data.augment`):
    every frame gets the same crop, flip or RandAugment ops, so motion between frames stays what it was."""
    if kind == "none":
        return frames
    import torch

    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # leading dims share one draw
    return _augmentation(kind, frames.shape[1])(clip).permute(0, 2, 3, 1).numpy()


def decode_rows(batch: pa.Table, augment: str = "none") -> dict[str, np.ndarray]:
    """Shard rows -> `video_id`, `frames` uint8 [B, T, H, W, 3] (each clip augmented by `augment`), `frame_mask`
    [B, T] and `captions` [B] (each a video's list of captions)."""
    columns = ["video_id", "captions", "frames", "frame_codec", "frame_size", "num_frames", "valid_frames"]
    rows = batch.select(columns).to_pylist()
    captions = np.empty(len(rows), dtype=object)
    captions[:] = [row["captions"] for row in rows]
    return {
        "video_id": np.array([row["video_id"] for row in rows], dtype=object),
        "frames": np.stack([augment_clip(frames_uint8(row), augment) for row in rows]),
        "frame_mask": frame_mask(rows),
        "captions": captions,
    }
