"""Read prepared shards for training and evaluation: a Ray Dataset at scale, a PyArrow table locally.

Independent of the model: normalisation statistics and the tokenizer come in as arguments (the model
exposes open_clip's), so the same shards serve any backbone.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.data import FileShuffleConfig

from hvd.data.manifest import SPLITS
from hvd.errors import InputError
from hvd.runtime.durable import write_text

SUMMARY_FILE = "_summary.json"  # written last by prepare: its presence marks a finished folder


class ShardError(InputError, ValueError):
    """Shards that are missing or unfinished; the message names the folder."""


@dataclass(frozen=True)
class ShardSummary:
    """A finished shard folder's `_summary.json`, the one reader and writer of it: prepare's folders record
    their settings (format, frame spec, manifest), the stills their own `identity`. A field at its default
    is left out of the file, so folders of either writer, and of older versions lacking a field, read back."""

    input: int
    written: int
    quarantined: int
    short_clips: int
    splits: dict[str, int]  # rows written per split
    shard_format: int = 0  # prepare's SHARD_FORMAT; 0 in the stills and the oldest folders
    frame_spec: dict[str, Any] | None = None  # FrameSpec.to_dict() of prepare's decode
    manifest_fingerprint: str = ""
    only_splits: list[str] | None = None  # the splits prepare was limited to, when it was
    manifest: str | None = None  # the manifest's resolved path
    identity: dict[str, Any] | None = None  # the stills': everything that decides their bytes

    @classmethod
    def read(cls, folder: str | Path) -> ShardSummary:
        """The summary of a finished folder; `ShardError` when it has none (unfinished) or it does not read."""
        path = Path(folder) / SUMMARY_FILE
        if not path.is_file():
            raise ShardError(f"{folder}: no {SUMMARY_FILE}; run pipelines/prepare.py first (or let it finish)")
        try:
            record = json.loads(path.read_text())
            return cls(**{field.name: record[field.name] for field in dataclasses.fields(cls) if field.name in record})
        except (ValueError, TypeError) as err:
            raise ShardError(f"{path} is not a shard summary ({err}); prepare the folder again with --overwrite") from err

    def record(self) -> dict[str, Any]:
        """What `_summary.json` holds: every field not at its default."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) != field.default}

    def write(self, folder: str | Path) -> Path:
        """`folder`'s `_summary.json`, whole or absent and on disk before the folder is published."""
        return write_text(Path(folder) / SUMMARY_FILE, json.dumps(self.record(), indent=2) + "\n")


def _split_dir(shards: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ShardError(f"unknown split {split!r} (choose one of {', '.join(SPLITS)})")
    counts = ShardSummary.read(shards).splits
    if not counts.get(split):
        raise ShardError(f"{shards}: no videos of split {split!r} were written (written: {counts})")
    folder = Path(shards) / split
    rows = sum(pq.read_metadata(file).num_rows for file in folder.glob("*.parquet"))
    if rows != counts[split]:
        raise ShardError(
            f"{folder}: {rows} rows on disk where {SUMMARY_FILE} says {counts[split]}; the folder changed after "
            "prepare finished it (another writer?): prepare it again with --overwrite"
        )
    return folder


def open_shards(shards: str | Path, split: str, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """One split as a Ray Dataset, rows in no fixed order (carry `video_id` along where order matters).
    `shuffle_seed`: the files are read in a fresh order at every execution (each training epoch), drawn from
    the seed and the execution's index, so a run's orders repeat with its seed."""
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    return ray.data.read_parquet(str(_split_dir(shards, split)), shuffle=shuffle)


def read_shards(shards: str | Path, split: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One split as an in-memory PyArrow table sorted by video_id, for small local use and tests."""
    table = pq.read_table(_split_dir(shards, split), columns=list(columns) if columns else None)
    return table.sort_by("video_id")


def frame_mask(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """[B, T] bool: which stored frames of each row are the clip's own (False on blank padding)."""
    return np.stack([np.arange(row["num_frames"]) < row["valid_frames"] for row in rows])


def frames_uint8(row: Mapping[str, Any]) -> np.ndarray:
    """A row's frames as `[T, H, W, 3]` uint8 RGB."""
    size, codec = int(row["frame_size"]), row["frame_codec"]
    if codec == "raw":
        return np.stack([np.frombuffer(frame, np.uint8).reshape(size, size, 3) for frame in row["frames"]])
    if codec == "jpeg":
        return np.stack([np.asarray(Image.open(io.BytesIO(frame)).convert("RGB")) for frame in row["frames"]])
    raise ShardError(f"video {row['video_id']}: unknown frame codec {codec!r}")
