"""Decode and sample every video of a manifest once into Parquet shards, on Ray Data CPU workers.

    python pipelines/prepare.py --manifest data/synthetic-demo/manifest.jsonl --out data/shards-demo
        [--overwrite] [data.num_frames=12 data.sample_mode=fps ...]

Without --manifest, the synthetic benchmark's manifest under synthetic.out. Starts a local Ray, or
joins the cluster in RAY_ADDRESS (video paths must then be readable on every node). Exits 0 unless no
video at all was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvd.cli import fail, parse_args
from hvd.data.prepare import QUARANTINE_FILE, prepare
from hvd.errors import HvdError


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", help="benchmark manifest, JSONL (data.manifest)")
    parser.add_argument("--out", help="shard folder (data.shards)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards prepared with other settings")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"manifest": args.manifest, "shards": args.out, "overwrite": "true" if args.overwrite else None}
    return [f"data.{key}={value}" for key, value in flags.items() if value is not None]


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(__doc__, ("data",), argv, add_flags, flag_overrides)
    manifest = Path(cfg.data.manifest or Path(cfg.synthetic.out) / "manifest.jsonl")
    out = Path(cfg.data.shards)
    try:
        summary = prepare(cfg, manifest, out, overwrite=cfg.data.overwrite)
    except (HvdError, ValueError) as err:
        fail(err)
    print(summary)
    if summary.quarantined:
        print(f"quarantined videos and their errors: {out / QUARANTINE_FILE}")
    if not summary.skipped:
        print(f"{summary.elapsed_s:.1f} s, {summary.input / max(summary.elapsed_s, 1e-9):.1f} videos/s -> {out}")
    if summary.written == 0:
        fail("no video was written")

