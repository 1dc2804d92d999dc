"""Memory of `prepare` on a manifest far larger than its clips: does anything grow with the row count?

    python benchmarks/prepare_scale.py [--rows 100000] [--object-store-mb 512] [--workers 2]

The manifest repeats a small benchmark's real clips (the `tiny` preset's 40) under `--rows` distinct video
ids, so decoding is real and the row count is what scales. Ray runs with its object store capped at
`--object-store-mb`. Sampled every second while prepare runs: the object store's bytes in use and bytes
spilled to disk (the raylet's store stats). Reported: peak driver RSS (`ru_maxrss`), peak object store
use, spilled bytes, videos/s, the 1-minute load average, and whether `_summary.json` holds
input == written + quarantined == rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from hvd.config import SyntheticConfig, load_config
from hvd.data.manifest import ManifestEntry, read_manifest, resolve_video_path
from hvd.data.prepare import prepare
from hvd.data.shards import ShardSummary
from hvd.data.synthetic import generate


def repeated_manifest(source: Path, rows: int, path: Path) -> Path:
    """`rows` entries cycling through the source's clips (absolute paths), each under its own id; streamed."""
    clips = [(str(resolve_video_path(e, source)), e.captions, e.split) for e in read_manifest(source)]
    with path.open("w") as handle:
        for row in range(rows):
            video, captions, split = clips[row % len(clips)]
            handle.write(ManifestEntry(f"v{row:08d}", video, captions, split).to_json() + "\n")
    return path


class StoreMonitor(threading.Thread):
    """Peak object store bytes in use and the latest spilled total, asked of the raylet every `every_s`."""

    def __init__(self, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.every_s, self.peak_used, self.spilled, self.samples = every_s, 0, 0, 0
        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            stats = get_memory_info_reply(self.state).store_stats
            self.peak_used = max(self.peak_used, stats.object_store_bytes_used)
            self.spilled = max(self.spilled, stats.spilled_bytes_total)
            self.samples += 1
            self.stopped.wait(self.every_s)

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--object-store-mb", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2, help="decode tasks at once (data.decode_concurrency)")
    parser.add_argument("--synthetic-out", default="data/synthetic-tiny", help="where the tiny benchmark's clips live")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="data.* overrides")
    args = parser.parse_args()

    source = generate(SyntheticConfig(preset="tiny", out=args.synthetic_out), progress=False)
    ray.init(num_cpus=args.workers, object_store_memory=args.object_store_mb << 20, include_dashboard=False)
    cfg = load_config(None, [*args.overrides, f"data.decode_concurrency={args.workers}"])
    with tempfile.TemporaryDirectory(prefix="prepare-scale-") as scratch:
        manifest = repeated_manifest(source, args.rows, Path(scratch) / "manifest.jsonl")
        monitor = StoreMonitor()
        monitor.start()
        load_before, started = os.getloadavg()[0], time.perf_counter()
        summary = prepare(cfg, manifest, Path(scratch) / "shards")
        seconds = time.perf_counter() - started
        monitor.stop()
        recorded = ShardSummary.read(Path(scratch) / "shards")
    results = {
        "rows": args.rows,
        "workers": args.workers,
        "object_store_cap_mb": args.object_store_mb,
        "seconds": round(seconds, 1),
        "videos_per_s": round(args.rows / seconds, 1),
        "peak_driver_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_object_store_mb": round(monitor.peak_used / 2**20, 1),
        "spilled_mb": round(monitor.spilled / 2**20, 1),
        "store_samples": monitor.samples,
        "input_written_quarantined": [recorded.input, recorded.written, recorded.quarantined],
        "invariant_holds": recorded.input == recorded.written + recorded.quarantined == args.rows,
        "load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "summary": str(summary),
    }
    print(json.dumps(results, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
