"""Generate the synthetic text-video benchmark: real H.264 clips plus a manifest.

    python pipelines/synthetic.py --preset tiny --out /tmp/synth [--seed N] [synthetic.event_fraction=0.3 ...]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from hvd.cli import parse_args
from hvd.data.manifest import read_manifest
from hvd.data.synthetic import generate, read_ceiling


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("tiny", "demo", "full", "long"), help="size preset (synthetic.preset)")
    parser.add_argument("--out", help="output folder (synthetic.out)")
    parser.add_argument("--seed", type=int, help="random seed (synthetic.seed)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder is up to date")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"preset": args.preset, "out": args.out, "seed": args.seed}
    return [f"synthetic.{key}={value}" for key, value in flags.items() if value is not None]


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(__doc__, ("synthetic",), argv, add_flags, flag_overrides)
    started = time.perf_counter()
    manifest = generate(cfg.synthetic, force=args.force)
    splits = Counter(entry.split for entry in read_manifest(manifest))
    print(
        f"{sum(splits.values())} clips ({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}) "
        f"in {time.perf_counter() - started:.1f} s -> {manifest}"
    )
    ceiling = read_ceiling(manifest)
    print("oracle ceiling, t2v R@1 of a model that sees exactly the named attributes: "
          + ", ".join(f"{split} {value:.1f}" for split, value in ceiling.items()))

