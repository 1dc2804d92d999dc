"""The training input pipeline: decoding runs in Ray Data CPU tasks, not in the training step.

shards -> `map_batches(decode_rows)` on CPU workers (JPEG -> uint8 frames of one fixed shape, `hvd.train.rows`)
-> each worker's `iter_torch_batches`, which prefetches and collates in a background thread (one caption drawn
per video and tokenised there) and copies uint8 frames to the worker's device (pinned, non-blocking on GPU),
where the model normalises them (`RetrievalModel.forward`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor

from hvd.config import Config
from hvd.data.shards import open_shards, read_shards
from hvd.model.backbone import PAD_TOKEN
from hvd.train.rows import decode_rows


def training_dataset(cfg: Config, shards: str | Path) -> ray.data.Dataset:
    """The train split, its files in a fresh order every pass (reproducible from `run.seed`), decoded by Ray
    Data tasks of `data.train_decode_cpus` CPUs each, one global batch of rows per task."""
    return open_shards(shards, "train", shuffle_seed=cfg.run.seed).map_batches(
        decode_rows,
        batch_format="pyarrow",
        batch_size=cfg.train.batch_size,
        num_cpus=cfg.data.train_decode_cpus,
        fn_kwargs={"augment": cfg.data.augment},
    )


def caption_passes(cfg: Config, shards: str | Path) -> int:
    """Passes over the train videos per epoch: 1, or with `data.expand_captions` the mean number of captions per
    video, so that an epoch trains on as many (caption, video) pairs as the split has captions, as the
    references do. Each pass is a fresh shuffle of whole videos, so a batch never holds one video twice
    (expanding rows per caption would put a video's captions side by side: false negatives in one batch)."""
    if not cfg.data.expand_captions:
        return 1
    counts = read_shards(shards, "train", ["video_id", "captions"])["captions"].combine_chunks().value_lengths()
    return max(1, round(pc.sum(counts).as_py() / len(counts)))


def caption_choice(seed: int, epoch: int, video_id: str, count: int, pass_index: int = 0) -> int:
    """Which of a video's captions a pass of an epoch trains on: pass p takes the p-th caption of an order drawn
    afresh for every (epoch, video), so `count` passes cover every caption once (CLIP4Clip's random caption,
    without repeats). Reproducible and independent of which worker or batch the video lands in."""
    order = np.random.default_rng(zlib.crc32(f"{seed}:{epoch}:{video_id}".encode())).permutation(count)
    return int(order[pass_index % count])


def trim_padding(tokens: np.ndarray) -> np.ndarray:
    """[B, L] token ids cut to the batch's longest caption: the text tower skips padding every caption has.
    Features are unchanged (the causal mask keeps padding out of every real token); ranks with different
    lengths are padded back to one shape when the loss gathers them (`hvd.model.losses`)."""
    return tokens[:, : int((tokens != PAD_TOKEN).sum(axis=1).max())]


class TrainingCollate(NumpyBatchCollateFn):
    """Numpy batch -> `{"tokens": [B, L] int64 (L: the batch's longest caption), "frames": [B, T, H, W, 3] uint8, "frame_mask": [B, T] bool}`;
    runs in the prefetch thread, which tokenises the one caption each video trains on."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor], seed: int, epoch: int, pass_index: int = 0):
        self.tokenizer, self.seed, self.epoch, self.pass_index = tokenizer, seed, epoch, pass_index

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Tensor]:
        captions = [
            str(c[caption_choice(self.seed, self.epoch, str(v), len(c), self.pass_index)])
            for v, c in zip(batch["video_id"], batch["captions"], strict=True)
        ]
        return {
            "tokens": torch.from_numpy(trim_padding(self.tokenizer(captions).numpy()).astype(np.int64)),
            "frames": torch.from_numpy(np.ascontiguousarray(batch["frames"])),
            "frame_mask": torch.from_numpy(batch["frame_mask"]),
        }


def epoch_batches(
    shard: ray.data.DataIterator, batch_size: int, tokenizer: Callable[[list[str]], Tensor], seed: int, epoch: int,
    pin_memory: bool, passes: int = 1, steps_per_pass: int | None = None, prefetch: int = 2,
) -> Iterator[dict[str, Tensor]]:
    """One epoch of a worker's shard on the worker's device, captions tokenised by `tokenizer` (the model's,
    `hvd.model.build_tokenizer`): `passes` passes (`caption_passes`) of
    `steps_per_pass` batches each (all of a pass when None), each pass over freshly shuffled files and a
    local shuffle buffer seeded by (seed, epoch, pass).

    On GPU the batches are pinned and copied without blocking, so the copy overlaps the previous step.
    """
    for pass_index in range(passes):
        batches = shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            prefetch_batches=prefetch,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=zlib.crc32(f"{seed}:{epoch}:{pass_index}".encode()),
            collate_fn=TrainingCollate(tokenizer, seed, epoch, pass_index),
            pin_memory=pin_memory,
        )
        yield from itertools.islice(batches, steps_per_pass)


class EpochStream:
    """A worker's batches for epochs `first`..`last`, read by one background thread that starts each epoch's Ray
    Data execution as soon as the previous epoch's batches are read: the new pipeline starts its tasks and fills
    its prefetch while the worker trains the epoch's last steps, validates and checkpoints, so the next epoch's
    first step does not wait for a cold start (`benchmarks/train_throughput.py --epochs`). Streaming split
    starts an epoch when every worker asks for it, which every worker's thread does at its own epoch end."""

    _END = object()  # closes an epoch's batches in the queue

    def __init__(self, make_epoch: Callable[[int], Iterator[dict[str, Tensor]]], first: int, last: int):
        self._make_epoch, self._first, self._last = make_epoch, first, last
        # one ready batch: a deeper queue gained nothing measured (benchmarks/train_throughput.py --epochs, depth 4)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="epoch-stream", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[int, object]) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        epoch = self._first
        try:
            for epoch in range(self._first, self._last + 1):
                for batch in self._make_epoch(epoch):
                    if not self._put((epoch, batch)):
                        return
                if not self._put((epoch, self._END)):
                    return
        except BaseException as error:  # noqa: BLE001 - raised again in the training loop's thread
            self._put((epoch, error))

    def epoch(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        """The batches of `epoch`; what is left of an earlier epoch (a loop that stopped early) is dropped."""
        if not self._first <= epoch <= self._last:
            raise ValueError(f"epoch {epoch} is outside this stream's epochs {self._first}..{self._last}")
        while True:
            tagged, item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if tagged < epoch:
                continue
            if tagged > epoch:
                raise RuntimeError(f"epoch {epoch} was asked for after epoch {tagged} had started")
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        """Stop reading ahead (a finished or failed run); the thread ends at its next batch."""
        self._closed.set()
