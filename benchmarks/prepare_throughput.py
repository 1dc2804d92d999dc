"""Throughput of `prepare` with 1 and 2 Ray decode workers, against the physical floor in the same run.

    python benchmarks/prepare_throughput.py [--preset full] [--limit N] [--workers 1 2]

The floor is one thread decoding every frame of the same clips with PyAV (`-f null` style: no colour
conversion), what exact frame sampling cannot beat without skipping decode work. Prints videos/s and
sampled frames/s per worker count, the ratio to the floor, and the speed-up from the first worker count.
Then, in this process, what the truncation check costs: `decode_clip` on the first `--check-clips` clips
with the check (one PyAV open of the container for its declared duration) and without
(`data.min_duration_fraction=0`), interleaved clip by clip: median ms per clip and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import av
import ray

from hvd.config import SyntheticConfig, load_config
from hvd.data.decode import FrameSpec, decode_clip
from hvd.data.manifest import ManifestEntry, read_manifest, resolve_video_path, write_manifest
from hvd.data.prepare import prepare
from hvd.data.synthetic import generate


def subset_manifest(manifest: Path, limit: int, folder: Path) -> Path:
    """The first `limit` videos (all when 0), paths made absolute so the copy can live anywhere."""
    entries = read_manifest(manifest)[: limit or None]
    absolute = [
        ManifestEntry(e.video_id, str(resolve_video_path(e, manifest)), e.captions, e.split, e.extra) for e in entries
    ]
    return write_manifest(absolute, folder / "manifest.jsonl")


def full_decode_seconds(manifest: Path) -> tuple[float, int]:
    """Wall time for one thread to decode every frame of every clip, and the number of frames decoded."""
    frames, started = 0, time.perf_counter()
    for entry in read_manifest(manifest):
        with av.open(entry.path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            frames += sum(1 for _ in container.decode(stream))
    return time.perf_counter() - started, frames


def truncation_check_cost(manifest: Path, spec: FrameSpec, clips: int) -> dict[str, float]:
    """Median `decode_clip` ms per clip with and without the truncation check, interleaved on the same clips."""
    paths = [resolve_video_path(entry, manifest) for entry in read_manifest(manifest)][:clips]
    variants = {"on": spec, "off": FrameSpec(**{**spec.to_dict(), "min_duration_fraction": 0.0})}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for path in paths:
        for name, variant in variants.items():
            started = time.perf_counter()
            decode_clip(path, variant)
            times[name].append(time.perf_counter() - started)
    on, off = (1000 * statistics.median(times[name]) for name in ("on", "off"))
    return {"clips": len(paths), "check_on_ms": round(on, 2), "check_off_ms": round(off, 2), "ratio": round(on / off, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=("tiny", "demo", "full"))
    parser.add_argument("--synthetic-out", default=None, help="benchmark folder (default data/synthetic-PRESET)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N videos only (0 = all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode worker counts to time")
    parser.add_argument("--check-clips", type=int, default=300, help="clips timed for the truncation check's cost")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="data.* overrides, e.g. data.num_frames=12")
    args = parser.parse_args()

    synthetic_out = args.synthetic_out or f"data/synthetic-{args.preset}"
    source = generate(SyntheticConfig(preset=args.preset, out=synthetic_out), progress=True)
    ray.init(num_cpus=max(args.workers), include_dashboard=False)
    results: dict[str, object] = {"cpus": os.cpu_count(), "preset": args.preset}
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as scratch:
        manifest = subset_manifest(source, args.limit, Path(scratch))
        videos = len(read_manifest(manifest))
        floor_s, source_frames = full_decode_seconds(manifest)  # also warms the page cache for every run
        results.update(videos=videos, source_frames=source_frames, floor_s=round(floor_s, 2))
        results["floor_videos_per_s"] = round(videos / floor_s, 1)

        warmup = subset_manifest(source, 8, Path(scratch) / "warmup")
        prepare(load_config(None, args.overrides), warmup, Path(scratch) / "warmup" / "shards")  # start Ray workers
        runs = {}
        for workers in args.workers:
            cfg = load_config(None, [*args.overrides, f"data.decode_concurrency={workers}"])
            started = time.perf_counter()
            summary = prepare(cfg, manifest, Path(scratch) / f"shards-{workers}")
            seconds = time.perf_counter() - started
            runs[workers] = {
                "seconds": round(seconds, 2),
                "videos_per_s": round(videos / seconds, 1),
                "frames_per_s": round(summary.written * cfg.data.num_frames / seconds, 1),
                "time_vs_floor": round(seconds / floor_s, 2),
                "quarantined": summary.quarantined,
            }
        base = runs[args.workers[0]]["seconds"]
        for run in runs.values():
            run["speedup"] = round(base / run["seconds"], 2)
        results["runs"] = runs
        spec = FrameSpec.from_config(load_config(None, args.overrides).data)
        results["truncation_check"] = truncation_check_cost(manifest, spec, args.check_clips)

    print(json.dumps(results, indent=2))
    print(f"\n| workers | s | videos/s | frames/s | time / floor | speed-up |  (floor: {floor_s:.1f} s)")
    for workers, run in runs.items():
        print(
            f"| {workers} | {run['seconds']} | {run['videos_per_s']} | {run['frames_per_s']} | "
            f"{run['time_vs_floor']} | {run['speedup']} |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
