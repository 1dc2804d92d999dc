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

# Ray Train datasets the epochs take turns over (`EpochStream`): epoch e reads EPOCH_DATASETS[e % 2]
EPOCH_DATASETS = ("train", "train_next")


def training_datasets(cfg: Config, shards: str | Path) -> dict[str, ray.data.Dataset]:
    """The train split under each name of EPOCH_DATASETS the run reads (both where `data.next_epoch_lead` starts
    epochs early and there is a next epoch, else the first), each with its own file orders (`training_dataset`)."""
    turns = 2 if cfg.data.next_epoch_lead and cfg.train.epochs > 1 else 1
    return {name: training_dataset(cfg, shards, cfg.run.seed + turn) for turn, name in enumerate(EPOCH_DATASETS[:turns])}


def training_dataset(cfg: Config, shards: str | Path, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """The train split, its files in a fresh order every pass (reproducible from `shuffle_seed`, by default
    `run.seed`), decoded by Ray Data tasks of `data.train_decode_cpus` CPUs each, one global batch of rows per task."""
    seed = cfg.run.seed if shuffle_seed is None else shuffle_seed
    return open_shards(shards, "train", shuffle_seed=seed).map_batches(
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
    """A worker's batches for epochs `first`..`last`, each epoch read by a background thread of its own into a
    one-batch queue, so the next epoch's Ray Data execution starts before the loop asks for it: its tasks start
    and its shuffle buffer fills while the worker trains, validates and checkpoints.

    A streaming split serves one epoch at a time (asking it for the next ends the one in progress), so epochs
    take turns over `sources` splits (`make_epoch` picks epoch e's by e % sources) and an epoch's reading waits
    until the epoch `sources` before it is read. With one source the next epoch starts when this one is read;
    with two, `start_next_after` batches into this one (`data.next_epoch_lead` before its end;
    `benchmarks/epoch_starts.py`). Streaming split starts an epoch when every worker asks for it, which every
    worker's thread does at the same batch."""

    _END = object()  # closes an epoch's batches in its queue

    def __init__(self, make_epoch: Callable[[int], Iterator[dict[str, Tensor]]], first: int, last: int,
                 sources: int = 1, start_next_after: int | None = None):
        self._make_epoch, self._first, self._last, self._sources = make_epoch, first, last, sources
        self._start_next_after = start_next_after if sources > 1 else None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        # epoch -> (its reader, its batches, set once its iterator is done)
        self._readers: dict[int, tuple[threading.Thread, queue.Queue, threading.Event]] = {}
        self._start(first)

    def _start(self, epoch: int) -> None:
        with self._lock:
            if epoch > self._last or epoch in self._readers or self._closed.is_set():
                return
            # one ready batch: a deeper queue gained nothing measured (benchmarks/train_throughput.py --epochs, depth 4)
            reader = threading.Thread(target=self._read, args=(epoch,), name=f"epoch-stream-{epoch}", daemon=True)
            self._readers[epoch] = (reader, queue.Queue(maxsize=1), threading.Event())
        reader.start()

    def _put(self, epoch: int, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self._readers[epoch][1].put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, epoch: int) -> None:
        done = self._readers[epoch][2]
        try:
            same_source = self._readers.get(epoch - self._sources)
            while same_source is not None and not same_source[2].wait(timeout=0.5):
                if self._closed.is_set():
                    return
            for index, batch in enumerate(self._make_epoch(epoch)):
                if index == self._start_next_after:
                    self._start(epoch + 1)
                if not self._put(epoch, batch):
                    return
            done.set()
            self._start(epoch + 1)
            self._put(epoch, self._END)
        except BaseException as error:  # noqa: BLE001 - raised again in the training loop's thread
            done.set()
            self._put(epoch, error)

    def epoch(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        """The batches of `epoch`; what is left of an earlier epoch (a loop that stopped early) is dropped."""
        if not self._first <= epoch <= self._last:
            raise ValueError(f"epoch {epoch} is outside this stream's epochs {self._first}..{self._last}")
        for earlier in range(self._first, epoch):
            self._drop(earlier)
        self._start(epoch)
        batches = self._readers[epoch][1]
        while True:
            item = batches.get()
            if isinstance(item, BaseException):
                raise item
            if item is self._END:
                return
            yield item

    def _drop(self, epoch: int) -> None:
        """Let an earlier epoch's reader finish without its batches: drain its queue until its end."""
        reader = self._readers.get(epoch)
        if reader is None:
            return
        thread, batches, _ = reader
        while thread.is_alive():
            try:
                batches.get(timeout=0.05)
            except queue.Empty:
                continue

    def close(self) -> None:
        """Stop reading ahead (a finished or failed run); every reader ends at its next batch."""
        self._closed.set()
