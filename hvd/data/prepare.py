"""Decode and sample every manifest video once, in parallel on Ray Data CPU workers, into Parquet shards.

Layout of the output folder:
    DIR/{train,val,test}/part-*.parquet  one row per video (`SHARD_SCHEMA`), the settings in the schema metadata
    DIR/quarantine.parquet               one row per video that gave no frames, with the reason
    DIR/_summary.json                    counts (input == written + quarantined), settings, manifest fingerprint

Streaming: the driver reads the manifest once to validate it and note where each line starts (16 bytes per
video); the manifest is then cut into parts of consecutive lines, and each Ray Data task reads its part's
lines, decodes them and writes the part's shard files itself, so memory and the object store hold one
part per running task whatever the manifest's size. Each video is decoded in a child process
(`hvd.data.decoder_process`): a decoder crash or hang quarantines that video, not its task.

The folder is built under a hidden sibling name, with `_summary.json` written last from what is on disk,
and renamed into place when complete, while the run holds the folder's lock (`hvd.data.folders`): a
concurrent prepare of the same folder waits, then finds the finished run. A re-run with the same manifest
and settings finds the summary and does nothing; after a kill it keeps the parts already written (each
file appears whole, its part's marker last) and decodes only the rest.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from hvd.config import Config, DataConfig
from hvd.data.decode import ClipDecoder, DecodedClip, FrameSpec, VideoLimits
from hvd.data.decoder_process import DecodeFailure, DecoderProcess
from hvd.data.folders import STAGING_IDENTITY, exclusive, publish, resumable_staging
from hvd.data.manifest import (
    SPLITS,
    ManifestEntry,
    ManifestIndex,
    index_manifest,
    read_manifest_range,
    resolve_video_path,
)
from hvd.data.shards import SUMMARY_FILE, ShardSummary
from hvd.errors import InputError
from hvd.runtime.cluster import ensure_ray
from hvd.runtime.durable import atomic_file, write_text
from hvd.runtime.paths import require_shared_paths

logger = logging.getLogger(__name__)

SHARD_FORMAT = 4  # bump when SHARD_SCHEMA changes, so old shards are never read as new ones
QUARANTINE_FILE = "quarantine.parquet"
METADATA_KEY = b"hvd"
PARTS = "_parts"  # while staging: each part's quarantine rows and its done marker
PLAN_FILE = "_plan.json"  # while staging: how the manifest was split into parts, kept for a resume
MAX_BLOCKS = 10_000
PROGRESS_EVERY_S = 30.0

SHARD_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("split", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("frames", pa.list_(pa.binary())),  # JPEG files, or frame_size*frame_size*3 RGB bytes
        ("frame_codec", pa.string()),  # jpeg | raw
        ("frame_size", pa.int32()),  # frames are frame_size x frame_size
        ("num_frames", pa.int32()),  # frames stored, padding included
        ("valid_frames", pa.int32()),  # the first valid_frames are the clip's; the rest are blank padding
        ("frame_indices", pa.list_(pa.int32())),  # of the valid frames, into the source's frames in order
        ("timestamps_s", pa.list_(pa.float64())),  # presentation time of each valid frame
        ("source_frames", pa.int32()),
        ("source_fps", pa.float64()),
        ("duration_s", pa.float64()),  # what the decodable frames cover
        ("truncated", pa.bool_()),  # kept with data.keep_truncated although it covers less than declared
        ("source_path", pa.string()),
        # The manifest's ground truth (`event`, as the synthetic benchmark records it) per valid frame; null without:
        ("event_frames", pa.list_(pa.bool_())),  # the frame shows the event
        ("target_boxes", pa.list_(pa.list_(pa.float32()))),  # the target's (x0, y0, x1, y1) in shares of the side; [] when absent
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("split", pa.string()),
        ("path", pa.string()),
        ("reason", pa.string()),  # missing | not_a_file | empty | no_video_stream | corrupt | truncated | too_large | out_of_memory | decoder_crash | timeout | <exception type>
        ("error", pa.string()),
    ]
)
# What a decode task returns: a shard row, or a quarantine row with `error` set and empty frames.
_DECODED_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [QUARANTINE_SCHEMA.field("reason"), QUARANTINE_SCHEMA.field("error")])


class PrepareError(InputError, RuntimeError):
    """The output folder cannot take this run (other settings, unfinished run) or rows went missing."""


@dataclass
class PrepareSummary:
    input: int
    written: int
    quarantined: int
    short_clips: int
    splits: dict[str, int]
    out: str
    skipped: bool = False  # the folder already held these shards; nothing was decoded
    elapsed_s: float = 0.0

    @classmethod
    def of(cls, summary: ShardSummary, out: Path, skipped: bool = False) -> PrepareSummary:
        """The run's outcome, from what the folder's summary records."""
        return cls(summary.input, summary.written, summary.quarantined, summary.short_clips, summary.splits, str(out),
                   skipped)

    def __str__(self) -> str:
        head = f"{self.out}: already prepared with these settings, nothing to do. " if self.skipped else ""
        return (
            f"{head}input {self.input} = written {self.written} + quarantined {self.quarantined} "
            f"({self.short_clips} short clips padded with masked blank frames)"
        )


def _identity(spec: FrameSpec, manifest_fingerprint: str, splits: tuple[str, ...] | None) -> dict[str, Any]:
    """What must match for existing shards to count as this run's output."""
    identity = {"shard_format": SHARD_FORMAT, "frame_spec": spec.to_dict(), "manifest_fingerprint": manifest_fingerprint}
    return identity if splits is None else {**identity, "only_splits": sorted(splits, key=SPLITS.index)}


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


OUTPUT_NAMES = (*SPLITS, QUARANTINE_FILE, SUMMARY_FILE)


def _check_existing(out: Path, identity: dict[str, Any], overwrite: bool) -> PrepareSummary | None:
    """The summary of an identical finished run, None to go ahead (the folder is then replaced whole);
    refuse to mix shards of two settings, or to replace a folder holding files prepare did not write."""
    if not out.is_dir():
        return None
    foreign = sorted(path.name for path in out.iterdir() if path.name not in OUTPUT_NAMES)
    if foreign:
        raise PrepareError(f"{out} holds files prepare did not write ({', '.join(foreign[:5])}); "
                           "give the shards a folder of their own")
    if overwrite or not any(out.iterdir()):
        return None
    if not (out / SUMMARY_FILE).is_file():
        raise PrepareError(f"{out} holds an unfinished prepare run (no {SUMMARY_FILE}); pass --overwrite to redo it")
    previous = ShardSummary.read(out)
    before, now = _flat(previous.record()), _flat(identity)
    differing = [key for key, value in now.items() if before.get(key) != value]
    if previous.shard_format < SHARD_FORMAT and all(k == "shard_format" or k not in before for k in differing):
        # The same videos and settings in an older layout (which may lack settings added since): derived
        # data, so it is redone rather than refused.
        logger.info(f"{out}: shards of format {previous.shard_format} are re-prepared as format "
                    f"{SHARD_FORMAT}")
        return None
    if differing:
        changed = "; ".join(f"{key}: {before.get(key)!r} -> {now[key]!r}" for key in differing)
        raise PrepareError(
            f"{out} holds shards prepared with other settings ({changed}); "
            "pass --overwrite (data.overwrite=true for train.py) to replace them"
        )
    return PrepareSummary.of(previous, out, skipped=True)


def _row(entry: ManifestEntry, path: Path, clip: DecodedClip | DecodeFailure, spec: FrameSpec) -> dict[str, Any]:
    """A shard row, or a quarantine row (`error` set, no frames) for a video that gave no frames."""
    row = {
        "video_id": entry.video_id,
        "split": entry.split,
        "captions": entry.captions,
        "frame_codec": spec.frame_codec,
        "frame_size": spec.frame_size,
        "source_path": str(path),
    }
    if isinstance(clip, DecodeFailure):
        return {**row, "frames": [], "num_frames": 0, "valid_frames": 0, "reason": clip.reason, "error": clip.error}
    return {**row, **asdict(clip), **ground_truth(entry.extra.get("event"), clip), "num_frames": len(clip.frames),
            "reason": None, "error": None}


def ground_truth(event: dict[str, Any] | None, clip: DecodedClip) -> dict[str, Any]:
    """Per valid frame, whether it shows the manifest's `event` and the target's box there.

    By source frame index when the event names its frames (`start_frame`, `end_frame`, a box per event frame),
    else by presentation time (`start_s`, `end_s`, no boxes). Boxes are shares of the side, so they hold
    through the resize of a square source (the synthetic benchmark's); a centre crop would move them.
    """
    if not isinstance(event, dict):
        return {"event_frames": None, "target_boxes": None}
    if "start_frame" in event:
        start, boxes = int(event["start_frame"]), event.get("boxes")
        inside = [start <= index < int(event["end_frame"]) for index in clip.frame_indices]
        if boxes is None:
            return {"event_frames": inside, "target_boxes": None}
        shown = zip(clip.frame_indices, inside, strict=True)
        return {"event_frames": inside, "target_boxes": [boxes[index - start] if on else [] for index, on in shown]}
    start_s, end_s = float(event["start_s"]), float(event["end_s"])
    return {"event_frames": [start_s - 1e-6 <= t < end_s - 1e-6 for t in clip.timestamps_s], "target_boxes": None}


def _shard_rows(batch: pa.Table, split: str) -> pa.Table:
    keep = pc.and_(pc.is_null(batch["error"]), pc.equal(batch["split"], split))
    return batch.filter(keep).select(SHARD_SCHEMA.names)


def _quarantine_rows(batch: pa.Table) -> pa.Table:
    failed = batch.filter(pc.is_valid(batch["error"]))
    return pa.table(
        [failed["video_id"], failed["split"], failed["source_path"], failed["reason"], failed["error"]],
        schema=QUARANTINE_SCHEMA,
    )


@dataclass(frozen=True)
class _Job:
    """What every decode task needs besides its part of the manifest."""

    manifest: Path
    out: Path  # the staging folder
    spec: FrameSpec
    splits: tuple[str, ...]
    decode: Callable[[Path, FrameSpec, VideoLimits], DecodedClip]
    timeout_s: float
    metadata: dict[bytes, bytes]
    limits: VideoLimits  # not in `spec`: they decide which videos are refused, not the frames of the others
    memory_mb: int  # each decode child's address space


_decoders: dict[tuple[bytes, float, int], DecoderProcess] = {}  # per Ray worker process, reused by its tasks


def _worker_decoder(job: _Job) -> DecoderProcess:
    decoder = DecoderProcess(job.decode, job.timeout_s, job.memory_mb)
    return _decoders.setdefault((decoder.fn_bytes, job.timeout_s, job.memory_mb), decoder)


def _part_name(part: int) -> str:
    return f"part-{part:06d}"


def _write_atomic(table: pa.Table, path: Path) -> None:
    """A file that is whole or absent, on disk before its name is (`hvd.runtime.durable`): a task killed mid-write
    leaves only a `.tmp` that resume ignores."""
    with atomic_file(path) as partial:
        pq.write_table(table, partial)


def _decode_part(part: int, start: int, end: int, job: _Job) -> None:
    """Decode the videos whose manifest lines lie in bytes [start, end) and write the part's files; the
    marker, written last, says the part is done."""
    entries = read_manifest_range(job.manifest, start, end, job.splits)
    paths = [resolve_video_path(entry, job.manifest) for entry in entries]
    clips = _worker_decoder(job).map((path, (job.spec, job.limits)) for path in paths)
    rows = [_row(entry, path, clip, job.spec) for entry, path, clip in zip(entries, paths, clips, strict=True)]
    table = pa.Table.from_pylist(rows, schema=_DECODED_SCHEMA)
    name = _part_name(part)
    for split in job.splits:
        shard = _shard_rows(table, split)
        if shard.num_rows:
            _write_atomic(shard.replace_schema_metadata(job.metadata), job.out / split / f"{name}.parquet")
    _write_atomic(_quarantine_rows(table), job.out / PARTS / f"{name}.parquet")
    write_text(job.out / PARTS / f"{name}.done", f"{len(entries)}\n")


def decode_parts(batch: dict[str, np.ndarray], job: _Job) -> dict[str, np.ndarray]:
    """Ray Data UDF over (part, start, end) rows: each part decoded and written by the task that takes it,
    so nothing but these three numbers passes through the object store."""
    for part, start, end in zip(batch["part"], batch["start"], batch["end"], strict=True):
        _decode_part(int(part), int(start), int(end), job)
    return {"part": batch["part"]}


def _written(folder: Path) -> tuple[int, int]:
    """Rows and short (padded) clips as they are on disk, the ground truth for the summary."""
    if not folder.is_dir():
        return 0, 0
    table = pq.read_table(folder, columns=["num_frames", "valid_frames"])
    short = pc.less(table["valid_frames"], table["num_frames"])
    return table.num_rows, pc.sum(short).as_py() or 0


def prepare(
    cfg: Config,
    manifest: Path,
    out: Path,
    overwrite: bool = False,
    splits: tuple[str, ...] | None = None,
    decode: Callable[[Path, FrameSpec, VideoLimits], DecodedClip] | None = None,
) -> PrepareSummary:
    """Decode every video of `manifest` (of `splits` only, when given) once into shards under `out`, each
    by `decode` (default: `ClipDecoder` of `data.decoder`) in a child process; see the module docstring
    for the layout."""
    started = time.perf_counter()
    manifest, out = Path(manifest), Path(out)
    clip_decoder = ClipDecoder(cfg.data.decoder)  # here first: an explicit decord that does not import stops the run
    decode = decode or clip_decoder
    index = index_manifest(manifest, splits)
    if not len(index):
        raise PrepareError(f"{manifest}: no videos of split(s) {', '.join(splits or SPLITS)}")
    spec = FrameSpec.from_config(cfg.data)
    identity = _identity(spec, index.fingerprint, splits)
    with exclusive(out, "prepare run"):
        previous = _check_existing(out, identity, overwrite)
        if previous is not None:
            return previous
        ensure_ray()
        require_shared_paths({"data.manifest": manifest, "data.shards": out})  # read and written on every node
        staging, resumed = resumable_staging(out, identity, resume=not overwrite)
        logger.info(f"{out.name}: decoding with {clip_decoder.decoder} here (data.decoder={cfg.data.decoder})")
        job = _Job(manifest, staging, spec, tuple(s for s in SPLITS if splits is None or s in splits), decode,
                   cfg.data.decode_timeout_s, {METADATA_KEY: json.dumps(identity).encode()},
                   VideoLimits.from_config(cfg.data), cfg.data.decode_memory_mb)
        _decode_missing_parts(index, job, cfg.data, resumed)
        summary = _finish(job, len(index), identity)
        publish(staging, out)
    return replace(summary, out=str(out), elapsed_s=round(time.perf_counter() - started, 3))


def _decode_missing_parts(index: ManifestIndex, job: _Job, data: DataConfig, resumed: bool) -> None:
    """Split the manifest into parts (kept from the interrupted run when resuming) and decode those not done."""
    plan = job.out / PLAN_FILE
    if resumed and plan.is_file():
        per_part = json.loads(plan.read_text())["videos_per_part"]
    else:  # at least two parts per concurrent task, so the last parts do not run alone
        per_part = min(data.shard_videos, math.ceil(len(index) / (2 * data.decode_concurrency)))
        write_text(plan, json.dumps({"videos_per_part": per_part}) + "\n")
    ranges = index.ranges(per_part)
    for leftover in job.out.rglob("*.tmp"):  # a task killed mid-write
        leftover.unlink()
    done = _verified_parts(job, [min(per_part, len(index) - part * per_part) for part in range(len(ranges))])
    if resumed:
        logger.info(f"{job.out.name}: resuming an interrupted run, "
                    f"{len(done)} of {len(ranges)} parts already written")
    todo = [{"part": part, "start": start, "end": end} for part, (start, end) in enumerate(ranges) if part not in done]
    if not todo:
        return
    finished = (
        ray.data.from_items(todo, override_num_blocks=min(len(todo), MAX_BLOCKS))
        .map_batches(
            decode_parts,
            fn_kwargs={"job": job},
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=data.decode_concurrency),
            num_cpus=data.decode_cpus,
            resources=data.decode_resources,  # e.g. {"cpu_node": 0.001}: decode only on the CPU node type
        )
    )
    # Ray Data reserves part of the cluster for each operator's outputs; these tasks' outputs are three numbers,
    # and on a small node the reservation held every decode task but one back for the first second or more.
    finished.context.op_resource_reservation_enabled = False
    started, last_report = time.monotonic(), time.monotonic()
    for count, _ in enumerate(finished.iter_rows(), start=1):  # streams: parts are written as they finish
        if time.monotonic() - last_report > PROGRESS_EVERY_S:
            last_report = time.monotonic()
            rate = count * per_part / (last_report - started)
            logger.info(f"{job.out.name}: {len(done) + count} of {len(ranges)} parts written, "
                        f"about {rate:.1f} videos/s")


def _verified_parts(job: _Job, videos: list[int]) -> set[int]:
    """The parts marked done whose files hold them whole: every parquet footer reads and their rows add up
    to the part's `videos`. A part that fails (a file damaged by a power loss or a disk error) is removed,
    saying so, to be decoded again: otherwise every re-run would fail on it."""
    done = set()
    for marker in sorted((job.out / PARTS).glob("part-*.done")):
        part = int(marker.name.split("-")[1].split(".")[0])
        name = _part_name(part)
        files = [job.out / PARTS / f"{name}.parquet", *(job.out / split / f"{name}.parquet" for split in job.splits)]
        problem = _part_problem(marker, files, videos[part]) if part < len(videos) else "not in the plan"
        if problem is None:
            done.add(part)
            continue
        logger.info(f"{job.out.name}: part {part} failed verification ({problem}); decoding it again")
        for path in (marker, *files):
            path.unlink(missing_ok=True)
    return done


def _part_problem(marker: Path, files: list[Path], videos: int) -> str | None:
    """What is wrong with a done part's files, or None."""
    try:
        count = int(marker.read_text())
    except ValueError:
        return f"its marker {marker.name} is unreadable"
    if count != videos:
        return f"its marker says {count} videos where the part has {videos}"
    rows = 0
    for path in (path for path in files if path.is_file()):
        try:
            rows += pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as err:
            return f"{path.parent.name}/{path.name} is unreadable: {err}"
    return None if rows == count else f"{rows} rows on disk where its marker says {count}"


def _finish(job: _Job, expected: int, identity: dict[str, Any]) -> PrepareSummary:
    """Gather the parts' quarantine rows into one file, then count what is on disk and write the summary."""
    parts = sorted((job.out / PARTS).glob("part-*.parquet"))
    quarantine = pa.concat_tables([*(pq.read_table(part) for part in parts), QUARANTINE_SCHEMA.empty_table()])
    pq.write_table(quarantine.sort_by("video_id").replace_schema_metadata(job.metadata), job.out / QUARANTINE_FILE)
    shutil.rmtree(job.out / PARTS)
    (job.out / PLAN_FILE).unlink()
    (job.out / STAGING_IDENTITY).unlink()

    stats = {split: _written(job.out / split) for split in job.splits if (job.out / split).is_dir()}
    split_counts = {split: rows for split, (rows, _) in stats.items()}
    written, quarantined = sum(split_counts.values()), quarantine.num_rows
    if written + quarantined != expected:
        raise PrepareError(f"{job.out}: {expected} videos in, but {written} written + {quarantined} quarantined")
    short = sum(count for _, count in stats.values())
    summary = ShardSummary(expected, written, quarantined, short, split_counts, **identity,
                           manifest=str(job.manifest.resolve()))
    summary.write(job.out)
    return PrepareSummary.of(summary, job.out)
