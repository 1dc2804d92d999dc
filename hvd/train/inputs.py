"""The training input pipeline: decoding and tokenising run in Ray Data CPU tasks, not in the training step.

shards -> `map_batches(decode_rows)` on CPU workers (JPEG -> uint8 frames of one fixed shape, every
caption -> token ids) -> each worker's `iter_torch_batches`, which prefetches and collates in a
background thread (one caption drawn per video) and copies uint8 frames to the worker's device (pinned,
non-blocking on GPU), where the model normalises them (`RetrievalModel.forward`).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor

from hvd.config import Config, ModelConfig
from hvd.data.shards import frame_mask, frames_uint8, open_shards
from hvd.model import build_tokenizer
from hvd.model.backbone import PAD_TOKEN

TOKEN_DTYPE = np.int32


@functools.lru_cache(maxsize=4)
def _tokenizer(preset: str, quick_gelu: bool, max_words: int) -> Callable[[list[str]], Tensor]:
    """One tokenizer per Ray worker process: loading the BPE vocabulary costs more than a batch."""
    return build_tokenizer(ModelConfig(preset=preset, quick_gelu=quick_gelu), max_words)


def decode_rows(batch: pa.Table, model_cfg: ModelConfig, max_words: int) -> dict[str, np.ndarray]:
    """Shard rows -> `video_id`, `frames` uint8 [B, T, H, W, 3], `frame_mask` [B, T] and `tokens`
    [B][captions, L] (ragged)."""
    tokenizer = _tokenizer(model_cfg.preset, model_cfg.quick_gelu, max_words)
    columns = ["video_id", "captions", "frames", "frame_codec", "frame_size", "num_frames", "valid_frames"]
    rows = batch.select(columns).to_pylist()
    tokens = np.empty(len(rows), dtype=object)
    tokens[:] = [tokenizer(row["captions"]).numpy().astype(TOKEN_DTYPE) for row in rows]
    return {
        "video_id": np.array([row["video_id"] for row in rows], dtype=object),
        "frames": np.stack([frames_uint8(row) for row in rows]),
        "frame_mask": frame_mask(rows),
        "tokens": tokens,
    }


def training_dataset(cfg: Config, shards: str | Path) -> ray.data.Dataset:
    """The train split, decoded and tokenised by Ray Data tasks of `data.train_decode_cpus` CPUs each, one
    global batch of rows per task."""
    data = open_shards(shards, "train")
    if cfg.data.expand_captions:  # every caption its own sample
        data = data.flat_map(lambda row: [{**row, "captions": [c]} for c in row["captions"]])
    return data.map_batches(
        decode_rows,
        batch_format="pyarrow",
        batch_size=cfg.train.batch_size,
        num_cpus=cfg.data.train_decode_cpus,
        fn_kwargs={"model_cfg": cfg.model, "max_words": cfg.data.max_words},
    )


def caption_choice(seed: int, epoch: int, video_id: str, count: int) -> int:
    """Which of a video's captions this epoch trains on: CLIP4Clip's random draw, fresh every epoch, but
    reproducible and independent of which worker or batch the video lands in (restarts redraw the same)."""
    return zlib.crc32(f"{seed}:{epoch}:{video_id}".encode()) % count


def trim_padding(tokens: np.ndarray) -> np.ndarray:
    """[B, L] token ids cut to the batch's longest caption: the text tower skips padding every caption has.
    Features are unchanged (the causal mask keeps padding out of every real token); ranks with different
    lengths are padded back to one shape when the loss gathers them (`hvd.model.losses`)."""
    return tokens[:, : int((tokens != PAD_TOKEN).sum(axis=1).max())]


class TrainingCollate(NumpyBatchCollateFn):
    """Numpy batch -> `{"tokens": [B, L] int64 (L: the batch's longest caption), "frames": [B, T, H, W, 3] uint8, "frame_mask": [B, T] bool}`;
    runs in the prefetch thread."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Tensor]:
        tokens = [
            t[caption_choice(self.seed, self.epoch, str(v), len(t))]
            for v, t in zip(batch["video_id"], batch["tokens"], strict=True)
        ]
        return {
            "tokens": torch.from_numpy(trim_padding(np.stack(tokens)).astype(np.int64)),
            "frames": torch.from_numpy(np.ascontiguousarray(batch["frames"])),
            "frame_mask": torch.from_numpy(batch["frame_mask"]),
        }


def epoch_batches(
    shard: ray.data.DataIterator, batch_size: int, seed: int, epoch: int, pin_memory: bool, prefetch: int = 2
) -> Iterator[dict[str, Tensor]]:
    """One epoch of a worker's shard, shuffled locally with a per-epoch seed, on the worker's device.

    On GPU the batches are pinned and copied without blocking, so the copy overlaps the previous step.
    """
    return iter(
        shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            prefetch_batches=prefetch,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed + epoch,
            collate_fn=TrainingCollate(seed, epoch),
            pin_memory=pin_memory,
        )
    )
