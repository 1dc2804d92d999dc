"""Decode and sample every manifest video once, in parallel on Ray Data CPU workers, into Parquet shards.

Layout of the output folder:
    DIR/{train,val,test}/*.parquet   one row per video (`SHARD_SCHEMA`), the settings in the schema metadata
    DIR/quarantine.parquet           one row per video that gave no frames, with the reason
    DIR/_summary.json                counts (input == written + quarantined), settings, manifest fingerprint

The folder is built under a hidden sibling name, with `_summary.json` written last from what is on disk,
and renamed into place when complete, while the run holds the folder's lock (`hvd.data.folders`): a
concurrent prepare of the same folder waits, then finds the finished run. A re-run with the same manifest
and settings finds the summary and does nothing. Decoded rows wait in Ray's object store (spilling to disk when
large) between decoding and the writes, so no video is decoded twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from hvd.config import Config, DataConfig
from hvd.data.decode import FrameSpec, decode_clip
from hvd.data.folders import exclusive, fresh_staging, publish
from hvd.data.manifest import SPLITS, ManifestEntry, fingerprint, read_manifest, resolve_video_path
from hvd.data.shards import SUMMARY_FILE
from hvd.paths import require_shared_paths
from hvd.reaper import watch_descendants
from hvd.worker_setup import quiet_logs, runtime_env, verbose

SHARD_FORMAT = 3  # bump when SHARD_SCHEMA changes, so old shards are never read as new ones
QUARANTINE_FILE = "quarantine.parquet"
METADATA_KEY = b"hvd"

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
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("split", pa.string()),
        ("path", pa.string()),
        ("reason", pa.string()),  # missing | not_a_file | empty | no_video_stream | corrupt | truncated | <exception type>
        ("error", pa.string()),
    ]
)
# What a decode task returns: a shard row, or a quarantine row with `error` set and empty frames.
_DECODED_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [QUARANTINE_SCHEMA.field("reason"), QUARANTINE_SCHEMA.field("error")])


class PrepareError(RuntimeError):
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
    summary_path = out / SUMMARY_FILE
    if not summary_path.is_file():
        raise PrepareError(f"{out} holds an unfinished prepare run (no {SUMMARY_FILE}); pass --overwrite to redo it")
    previous = json.loads(summary_path.read_text())
    before, now = _flat(previous), _flat(identity)
    differing = [key for key, value in now.items() if before.get(key) != value]
    if before.get("shard_format", 0) < SHARD_FORMAT and all(k == "shard_format" or k not in before for k in differing):
        # The same videos and settings in an older layout (which may lack settings added since): derived
        # data, so it is redone rather than refused.
        print(f"{out}: shards of format {before.get('shard_format')} are re-prepared as format {SHARD_FORMAT}", flush=True)
        return None
    if differing:
        changed = "; ".join(f"{key}: {before.get(key)!r} -> {now[key]!r}" for key in differing)
        raise PrepareError(
            f"{out} holds shards prepared with other settings ({changed}); "
            "pass --overwrite (data.overwrite=true for train.py) to replace them"
        )
    counts = {key: previous[key] for key in ("input", "written", "quarantined", "short_clips", "splits")}
    return PrepareSummary(**counts, out=str(out), skipped=True)


def _decoded_row(item: dict[str, Any], spec: FrameSpec) -> dict[str, Any]:
    row = {
        "video_id": item["video_id"],
        "split": item["split"],
        "captions": item["captions"],
        "frame_codec": spec.frame_codec,
        "frame_size": spec.frame_size,
        "source_path": item["path"],
    }
    try:
        clip = decode_clip(item["path"], spec)
    except Exception as err:  # any failure of one video quarantines that video, never the job
        reason = getattr(err, "reason", type(err).__name__)
        return {**row, "frames": [], "num_frames": 0, "valid_frames": 0, "reason": reason, "error": str(err)}
    return {**row, **asdict(clip), "num_frames": len(clip.frames), "reason": None, "error": None}


def decode_batch(batch: pa.Table, spec: FrameSpec) -> pa.Table:
    """Ray Data UDF: one output row per input row, whether the video decodes or not."""
    return pa.Table.from_pylist([_decoded_row(item, spec) for item in batch.to_pylist()], schema=_DECODED_SCHEMA)


def _shard_rows(batch: pa.Table, split: str) -> pa.Table:
    keep = pc.and_(pc.is_null(batch["error"]), pc.equal(batch["split"], split))
    return batch.filter(keep).select(SHARD_SCHEMA.names)


def _quarantine_rows(batch: pa.Table) -> pa.Table:
    failed = batch.filter(pc.is_valid(batch["error"]))
    return pa.table(
        [failed["video_id"], failed["split"], failed["source_path"], failed["reason"], failed["error"]],
        schema=QUARANTINE_SCHEMA,
    )


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray; an already running Ray is kept.

    Every worker process runs `hvd.worker_setup.setup_worker` first. Ray's info logs and Ray Data's
    progress bars (hundreds of redrawn lines a run) stay off unless `--verbose` on a terminal: each
    pipeline prints its own summary.
    """
    ray.data.DataContext.get_current().enable_progress_bars = verbose() and sys.stderr.isatty()
    quiet_logs()
    if ray.is_initialized():
        return
    level = logging.INFO if verbose() else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env(), logging_level=level)
    else:
        watch_descendants()  # a killed pipeline leaves no Ray daemons behind
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=runtime_env(), logging_level=level)


def _written(folder: Path) -> tuple[int, int]:
    """Rows and short (padded) clips as they are on disk, the ground truth for the summary."""
    if not folder.is_dir():
        return 0, 0
    table = pq.read_table(folder, columns=["num_frames", "valid_frames"])
    short = pc.less(table["valid_frames"], table["num_frames"])
    return table.num_rows, pc.sum(short).as_py() or 0


def prepare(
    cfg: Config, manifest: Path, out: Path, overwrite: bool = False, splits: tuple[str, ...] | None = None
) -> PrepareSummary:
    """Decode every video of `manifest` (of `splits` only, when given) once into shards under `out`; see the
    module docstring for the layout."""
    started = time.perf_counter()
    manifest, out = Path(manifest), Path(out)
    entries = [e for e in read_manifest(manifest) if splits is None or e.split in splits]
    if not entries:
        raise PrepareError(f"{manifest}: no videos of split(s) {', '.join(splits or SPLITS)}")
    spec = FrameSpec.from_config(cfg.data)
    identity = _identity(spec, fingerprint(manifest), splits)
    with exclusive(out, "prepare run"):
        previous = _check_existing(out, identity, overwrite)
        if previous is not None:
            return previous
        ensure_ray()
        require_shared_paths({"data.manifest": manifest, "data.shards": out})  # read and written on every node
        staging = fresh_staging(out)
        summary = _decode_and_write(entries, manifest, staging, spec, cfg.data, identity)
        publish(staging, out)
    return replace(summary, out=str(out), elapsed_s=round(time.perf_counter() - started, 3))


def _decode_and_write(
    entries: list[ManifestEntry], manifest: Path, out: Path, spec: FrameSpec, data: DataConfig, identity: dict[str, Any]
) -> PrepareSummary:
    """Decode every entry once and write shards, quarantine and, last, the summary counted from disk."""
    items = [
        {"video_id": e.video_id, "split": e.split, "captions": e.captions, "path": str(resolve_video_path(e, manifest))}
        for e in sorted(entries, key=lambda e: e.video_id)  # each block, so each shard, a contiguous id range
    ]
    num_blocks = min(len(items), max(2 * data.decode_concurrency, math.ceil(len(items) / data.shard_videos)))
    decoded = (
        ray.data.from_items(items, override_num_blocks=num_blocks)
        .map_batches(
            decode_batch,
            fn_kwargs={"spec": spec},
            batch_format="pyarrow",
            batch_size=data.decode_batch_size,
            compute=ray.data.TaskPoolStrategy(size=data.decode_concurrency),
            num_cpus=data.decode_cpus,
            resources=data.decode_resources,  # e.g. {"cpu_node": 0.001}: decode only on the CPU node type
        )
        .materialize()  # decoded once, then split into shards and quarantine without decoding again
    )

    metadata = {METADATA_KEY: json.dumps(identity).encode()}
    splits = sorted({item["split"] for item in items}, key=SPLITS.index)
    for split in splits:
        shards = decoded.map_batches(_shard_rows, fn_kwargs={"split": split}, batch_format="pyarrow")
        shards.write_parquet(str(out / split), schema=SHARD_SCHEMA.with_metadata(metadata))
    quarantine = decoded.map_batches(_quarantine_rows, batch_format="pyarrow").to_arrow_refs()
    quarantine_table = pa.concat_tables([*ray.get(quarantine), QUARANTINE_SCHEMA.empty_table()])
    pq.write_table(quarantine_table.sort_by("video_id").replace_schema_metadata(metadata), out / QUARANTINE_FILE)

    stats = {split: _written(out / split) for split in splits}
    split_counts = {split: rows for split, (rows, _) in stats.items()}
    written, quarantined = sum(split_counts.values()), pq.read_metadata(out / QUARANTINE_FILE).num_rows
    if written + quarantined != len(items):
        raise PrepareError(f"{out}: {len(items)} videos in, but {written} written + {quarantined} quarantined")
    short = sum(count for _, count in stats.values())
    summary = PrepareSummary(len(items), written, quarantined, short, split_counts, str(out))
    record = {**asdict(summary), **identity, "manifest": str(manifest.resolve())}
    del record["skipped"], record["out"], record["elapsed_s"]
    (out / SUMMARY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return summary
