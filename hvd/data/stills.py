"""Captioned stills of the synthetic world, written as one-frame shards: the warm start's image-text data.

Real users start from CLIP weights pretrained on images and their captions; the synthetic world's
equivalent is a still with its target object in view (random attributes, clutter, distractors) and
captions of what it shows, phrased as the benchmark phrases them. The stills are drawn from their own
random stream: none is a frame of a benchmark clip, and target sizes vary over `ENTITY_SCALES` whatever the
benchmark's `entity_scale`, as image pretraining sees objects of every size. They are written in the shard layout `prepare`
writes (one frame per row), so the same Ray Data input pipeline and Ray Train loop train on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hvd.data.folders import building
from hvd.data.prepare import SHARD_SCHEMA
from hvd.data.shards import SUMMARY_FILE, ShardSummary
from hvd.data.synthetic import ATTRIBUTES, ClipSpec, Settings, captions_for, in_processes, render_still

STILLS_FORMAT = 1  # bump when what a still shows or how it is stored changes: cached warm starts are redone
CAPTIONS_PER_STILL = 3  # phrasings; training draws one per epoch
ENTITY_SCALES = (0.18, 0.4)  # target sizes drawn per still: one warm start serves every benchmark entity_scale
ROWS_PER_FILE = 2048
JPEG_QUALITY = 90


def _row(index: int, split: str, settings: Settings) -> dict:
    rng = np.random.default_rng([settings.seed, 4, index])
    settings = dataclasses.replace(settings, entity_scale=float(rng.uniform(*ENTITY_SCALES)))
    attributes = {key: values[rng.integers(len(values))] for key, values in ATTRIBUTES.items()}
    spec = ClipSpec(index, f"still{index:07d}", split, motion=None, **attributes)
    buffer = io.BytesIO()
    Image.fromarray(render_still(spec, settings, index)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return {
        "video_id": spec.video_id, "split": split, "captions": captions_for(spec, CAPTIONS_PER_STILL, rng),
        "frames": [buffer.getvalue()], "frame_codec": "jpeg", "frame_size": settings.frame_size,
        "num_frames": 1, "valid_frames": 1, "frame_indices": [0], "timestamps_s": [0.0], "source_frames": 1,
        "source_fps": float(settings.fps), "duration_s": 1.0 / settings.fps, "truncated": False,
        "source_path": "",
    }


def _write_part(job: tuple[int, int, str, Settings, str]) -> int:
    start, count, split, settings, folder = job
    rows = [_row(index, split, settings) for index in range(start, start + count)]
    path = Path(folder) / split / f"part-{start:07d}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path)
    return count


def stills_identity(settings: Settings, counts: dict[str, int]) -> dict:
    """Everything that decides the stills' bytes; its hash names the folder and the warm start."""
    world = {key: value for key, value in settings.__dict__.items() if key != "keyframe_s"}  # a video encoding choice
    return {"stills_format": STILLS_FORMAT, "settings": world, "splits": counts}


def digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def write_stills(settings: Settings, counts: dict[str, int], out: str | Path, workers: int = 0) -> Path:
    """`counts` stills per split (e.g. {"train": 30000, "val": 500}) as shards under `out`; a folder that
    already holds these stills is reused. Written as `prepare` writes: one writer at a time, into a staging
    folder renamed into place, `_summary.json` last."""
    out = Path(out)
    identity = stills_identity(settings, counts)
    with building(out, "stills writer", lambda folder: _holds(folder, identity)) as staging:
        if staging is None:
            return out
        jobs, first = [], 0
        for split, count in counts.items():
            (staging / split).mkdir()
            jobs += [(s, min(ROWS_PER_FILE, first + count - s), split, settings, str(staging))
                     for s in range(first, first + count, ROWS_PER_FILE)]
            first += count
        written = sum(in_processes(_write_part, jobs, workers))
        if written != sum(counts.values()):
            raise RuntimeError(f"{out}: {sum(counts.values())} stills planned, {written} written")
        ShardSummary(written, written, 0, 0, counts, identity=identity).write(staging)
    return out


def _holds(folder: Path, identity: dict) -> bool:
    """Whether `folder` is a finished stills folder of `identity`."""
    return (folder / SUMMARY_FILE).is_file() and ShardSummary.read(folder).identity == identity
