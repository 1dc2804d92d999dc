"""The demo's quality and time targets: `make demo`'s wall time from nothing, and seeds of hvd against meanp.

    .venv/bin/python benchmarks/demo_quality.py [--seeds 3] [--warm-starts] [--heads hvd meanp] [key=value ...]

Runs `python pipelines/train.py` as `make demo` does, in a fresh HVD_ROOT (no benchmark, shards, warm start
or MLflow store yet), so the first run's wall time is the demo's, warm start included; later runs reuse
what it made, as a user's second run does. Prints each run, then the mean and standard deviation per head
of test t2v and v2t R@1 and R@5, beside the benchmark's oracle ceiling. With `--warm-starts`, seed N also
pretrains its own warm start (`pretrain.seed=N`): the spread over warm starts and fine-tuning together, as a
researcher's three runs from three CLIP pretrainings would show; without, every seed fine-tunes one warm start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("test/t2v/R1", "test/t2v/R5", "test/v2t/R1", "test/v2t/R5")


def run_demo(
    root: Path, head: str, seed: int, overrides: list[str], warm_starts: bool = False
) -> tuple[float, dict[str, float], float | None]:
    """One `pipelines/train.py` run: wall seconds, test metrics, oracle ceiling."""
    name = f"{head}-s{seed}" + ("-w" if warm_starts else "")
    command = [sys.executable, str(ROOT / "pipelines" / "train.py"), f"model.head={head}", f"run.seed={seed}",
               f"run.name=demo-{name}", "tracking.experiment=demo-quality", *overrides,
               *([f"pretrain.seed={seed}"] if warm_starts else [])]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=root, env={**os.environ, "HVD_ROOT": str(root)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("demo-quality").experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"attributes.run_name = 'demo-{name}'")
    ceiling = run.data.tags.get("oracle_test_t2v_R1_ceiling")
    return wall, {k: run.data.metrics[k] for k in METRICS}, float(ceiling) if ceiling else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--warm-starts", action="store_true", help="each seed pretrains its own warm start")
    parser.add_argument("--heads", nargs="+", default=["hvd", "meanp"])
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {head: [] for head in args.heads}
    ceiling = None
    with tempfile.TemporaryDirectory(prefix="hvd-demo-") as tmp:
        for seed in range(args.seeds):
            for head in args.heads:
                wall, metrics, ceiling = run_demo(Path(tmp), head, seed, args.overrides, args.warm_starts)
                results[head].append(metrics)
                first = ""
                if head == args.heads[0] and seed == 0:
                    first = " (from nothing: warm start, benchmark and shards made)"
                elif head == args.heads[0] and args.warm_starts:
                    first = " (its own warm start made)"
                print(f"{head} seed {seed}: {wall / 60:.1f} min{first}; "
                      + " ".join(f"{k.removeprefix('test/')} {v:.1f}" for k, v in metrics.items()), flush=True)
    print(f"\noracle ceiling: test t2v R@1 {ceiling}")
    print("| head | " + " | ".join(k.removeprefix("test/") for k in METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for head, runs in results.items():
        cells = []
        for key in METRICS:
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.1f} +- {spread:.1f}")
        print(f"| {head} (n={len(runs)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
