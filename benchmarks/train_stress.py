"""Run the real training command again and again and count native crashes, failures and worker restarts.

    python benchmarks/train_stress.py [--runs 10] [--logs DIR] [key=value ...]

Each run is `python pipelines/train.py train.epochs=1 run.name=stress-<i> [key=value ...]` in its own
process (generation and prepare are cached after the first), with `PYTHONFAULTHANDLER=1` in every
process it starts (Ray workers also enable it in `hvd.runtime.worker_setup`), so a native crash leaves every
thread's Python stack in that run's log under `--logs`. Prints one JSON object; exits 1 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "train.py"
NATIVE_CRASH = re.compile(r"Fatal Python error|SIGSEGV|SIGABRT|SIGBUS|Segmentation fault|core dumped")
RESUMED = re.compile(r"^resumed\s+(\d+) time", re.MULTILINE)


def run_once(index: int, overrides: list[str], logs: Path) -> dict:
    log = logs / f"stress-{index}.log"
    command = [sys.executable, str(PIPELINE), "train.epochs=1", f"run.name=stress-{index}", *overrides]
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                              check=False).returncode
    text = log.read_text(errors="replace")
    resumed = RESUMED.search(text)
    return {
        "run": index,
        "exit_code": code,
        "native_crash": bool(NATIVE_CRASH.search(text)),
        "worker_restarts": int(resumed.group(1)) if resumed else None,
        "seconds": round(time.perf_counter() - started, 1),
        "log": str(log),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--logs", default="runs/stress")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    summary = stress(args.runs, args.overrides, Path(args.logs))
    print(json.dumps(summary, indent=2))
    return 0 if summary["succeeded"] == summary["runs"] and not summary["native_crashes"] else 1


def stress(count: int, overrides: list[str], logs: Path) -> dict:
    """`count` runs of the training command, one after another; what each ended with and the totals."""
    logs.mkdir(parents=True, exist_ok=True)
    runs = [run_once(index, overrides, logs) for index in range(1, count + 1)]
    return {
        "runs": len(runs),
        "succeeded": sum(r["exit_code"] == 0 for r in runs),
        "native_crashes": sum(r["native_crash"] for r in runs),
        "worker_restarts": sum(r["worker_restarts"] or 0 for r in runs),
        "each": runs,
    }


if __name__ == "__main__":
    sys.exit(main())
