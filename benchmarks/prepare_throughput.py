"""Throughput of `prepare` with 1 and 2 Ray decode workers, against the physical floor in the same run.

    python benchmarks/prepare_throughput.py [--preset full|long] [--limit N] [--copies C] [--workers 1 2]
        [--decoders decord pyav]

The floor is one thread decoding every frame of the same clips with PyAV (`-f null` style: no colour
conversion). On one-GOP clips (tiny, demo, full) exact sampling cannot beat it; on the `long` preset
(40 s at 30 fps, a keyframe every 2 s) sampling 12 frames decodes only from each sample's keyframe. Prints
videos/s and sampled frames/s per worker count, the floor's time over prepare's (above 1: faster than the
floor), the speed-up from the first worker count, and the 1-minute load average before and after each.
Floor and runs are repeated in interleaved rounds (`--repeats`); the fastest of each is compared.
With several `--decoders` (`data.decoder`), every worker count runs with each, in the same rounds, and each
run after the first decoder's reports its time over that decoder's (`vs_first_decoder`). Then, in this
process, on the first `--check-clips` clips, interleaved clip by clip (median ms per clip and their ratio):
`decode_clip` with each decoder, and what the truncation check costs, with the check (one PyAV open of the
container for its declared duration) and without (`data.min_duration_fraction=0`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import psutil
import ray

from hvd.config import SyntheticConfig, load_config
from hvd.data.decode import DECODERS, FrameSpec, decode_clip
from hvd.data.manifest import ManifestEntry, read_manifest, resolve_video_path, write_manifest
from hvd.data.prepare import prepare
from hvd.data.synthetic import generate


def subset_manifest(manifest: Path, limit: int, folder: Path, copies: int = 1) -> Path:
    """The first `limit` videos (all when 0), `copies` times under distinct ids, paths made absolute so the
    copy can live anywhere."""
    entries = read_manifest(manifest)[: limit or None]
    absolute = [
        ManifestEntry(f"{e.video_id}-{copy}", str(resolve_video_path(e, manifest)), e.captions, e.split, e.extra)
        for copy in range(copies) for e in entries
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


def busy_cores(before, after, seconds: float) -> float:
    """Cores the whole machine kept busy over a run: decoding plus Ray's and the driver's own work."""
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    return round((sum(after) - sum(before) - idle) / seconds, 2)


def median_ms_per_clip(paths: list[Path], variants: dict[str, Callable[[Path], object]]) -> dict[str, float]:
    """Median ms per clip of each way to decode, taking the clips one by one and every variant on each in turn,
    so a slow spell of a shared machine hits them all."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for path in paths:
        for name, decode in variants.items():
            started = time.perf_counter()
            decode(path)
            times[name].append(time.perf_counter() - started)
    return {name: round(1000 * statistics.median(seconds), 2) for name, seconds in times.items()}


def decoder_cost(paths: list[Path], spec: FrameSpec, decoders: list[str]) -> dict[str, float]:
    """`decode_clip`'s median ms per clip with each decoder, and each one's over the first's."""
    ms = median_ms_per_clip(paths, {d: lambda path, d=d: decode_clip(path, spec, decoder=d) for d in decoders})
    return {"clips": len(paths), **{f"{d}_ms": ms[d] for d in decoders},
            **{f"{d}_over_{decoders[0]}": round(ms[d] / ms[decoders[0]], 3) for d in decoders[1:]}}


def truncation_check_cost(paths: list[Path], spec: FrameSpec, decoder: str) -> dict[str, float]:
    """`decode_clip`'s median ms per clip with and without the truncation check."""
    off = FrameSpec(**{**spec.to_dict(), "min_duration_fraction": 0.0})
    ms = median_ms_per_clip(paths, {name: lambda path, s=variant: decode_clip(path, s, decoder=decoder)
                                    for name, variant in (("on", spec), ("off", off))})
    return {"clips": len(paths), "check_on_ms": ms["on"], "check_off_ms": ms["off"], "ratio": round(ms["on"] / ms["off"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=("tiny", "demo", "full", "long"))
    parser.add_argument("--synthetic-out", default=None, help="benchmark folder (default data/synthetic-PRESET)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N videos only (0 = all)")
    parser.add_argument("--copies", type=int, default=1, help="list every clip this many times (more work per run)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode worker counts to time")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of floor and runs; the fastest of each is kept")
    parser.add_argument("--check-clips", type=int, default=300, help="clips timed in this process, per decoder")
    parser.add_argument("--decoders", nargs="+", default=["auto"], choices=DECODERS,
                        help="data.decoder values to run, each against the first")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="data.* overrides, e.g. data.num_frames=12")
    args = parser.parse_args()

    synthetic_out = args.synthetic_out or f"data/synthetic-{args.preset}"
    source = generate(SyntheticConfig(preset=args.preset, out=synthetic_out), progress=True)
    ray.init(num_cpus=max(args.workers), include_dashboard=False)
    results: dict[str, object] = {"cpus": os.cpu_count(), "preset": args.preset}
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as scratch:
        manifest = subset_manifest(source, args.limit, Path(scratch), args.copies)
        videos = len(read_manifest(manifest))
        warmup = subset_manifest(source, 8, Path(scratch) / "warmup")
        for decoder in args.decoders:  # start Ray workers and each decoder's decode children
            cfg = load_config(None, [*args.overrides, f"data.decoder={decoder}"])
            prepare(cfg, warmup, Path(scratch) / "warmup" / f"shards-{decoder}")
        floors, summaries = [], {}
        variants = [(decoder, workers) for decoder in args.decoders for workers in args.workers]
        times, loads, busy = ({v: [] for v in variants} for _ in range(3))
        for round_ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every variant
            floor_s, source_frames = full_decode_seconds(manifest)  # the first also warms the page cache
            floors.append(floor_s)
            for decoder, workers in variants:
                overrides = [*args.overrides, f"data.decoder={decoder}", f"data.decode_concurrency={workers}"]
                cfg = load_config(None, overrides)
                load_before, cpu_before = os.getloadavg()[0], psutil.cpu_times()
                started = time.perf_counter()
                out = Path(scratch) / f"shards-{decoder}-{workers}-{round_}"
                summaries[decoder, workers] = prepare(cfg, manifest, out)
                times[decoder, workers].append(time.perf_counter() - started)
                loads[decoder, workers].append([round(load_before, 2), round(os.getloadavg()[0], 2)])
                busy[decoder, workers].append(busy_cores(cpu_before, psutil.cpu_times(), times[decoder, workers][-1]))
        floor_s = min(floors)
        results.update(videos=videos, source_frames=source_frames, floor_s=round(floor_s, 2),
                       floor_all_s=[round(f, 2) for f in floors], floor_videos_per_s=round(videos / floor_s, 1))
        runs = {}
        for decoder, workers in variants:
            seconds, fastest = min(times[decoder, workers]), int(np.argmin(times[decoder, workers]))
            runs[decoder, workers] = {
                "seconds": round(seconds, 2),
                "all_s": [round(t, 2) for t in times[decoder, workers]],
                "videos_per_s": round(videos / seconds, 1),
                "frames_per_s": round(summaries[decoder, workers].written * cfg.data.num_frames / seconds, 1),
                "floor_over_prepare": round(floor_s / seconds, 2),
                "quarantined": summaries[decoder, workers].quarantined,
                "load": loads[decoder, workers][fastest],
                "busy_cores": busy[decoder, workers][fastest],
                "speedup": round(min(times[decoder, args.workers[0]]) / seconds, 2),
                "vs_first_decoder": round(seconds / min(times[args.decoders[0], workers]), 3),
            }
        results["runs"] = {f"{decoder}/{workers}": run for (decoder, workers), run in runs.items()}
        spec = FrameSpec.from_config(load_config(None, args.overrides).data)
        paths = [resolve_video_path(entry, manifest) for entry in read_manifest(manifest)][: args.check_clips]
        results["decode_clip"] = decoder_cost(paths, spec, args.decoders)
        results["truncation_check"] = truncation_check_cost(paths, spec, args.decoders[0])

    print(json.dumps(results, indent=2))
    print(f"\n| decoder | workers | s | videos/s | frames/s | floor / prepare | speed-up | vs {args.decoders[0]} | "
          f"cores busy | load 1 min |  (floor: {floor_s:.1f} s)")
    for (decoder, workers), run in runs.items():
        print(
            f"| {decoder} | {workers} | {run['seconds']} | {run['videos_per_s']} | {run['frames_per_s']} | "
            f"{run['floor_over_prepare']} | {run['speedup']} | {run['vs_first_decoder']} | {run['busy_cores']} | "
            f"{run['load'][0]} -> {run['load'][1]} |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
