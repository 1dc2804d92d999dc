"""How long does each epoch's first step wait for data? Real training runs, one per `data.next_epoch_lead`.

    python benchmarks/epoch_starts.py [--leads 0 4] [--repeats 2] [--out data/bench-epoch-starts] [key=value ...]

Each run is a warm start (`hvd.train.warm_start.pretrain`: Ray Train with the config's workers, the stills'
streaming splits, validation and a checkpoint at every epoch end), the path `make demo` takes first, on
`pretrain.train_stills` stills (default here 5,120, 40 steps an epoch at the demo's batch of 128) for
`pretrain.epochs` epochs (default here 4). The runs alternate over `--leads` (0: the next epoch's Ray Data
execution starts when the epoch is read; N: N batches before its end, over two copies of the split) and share
one folder of stills; each trains afresh. Per run it reads `train/epoch_start_wait_s` (what the first step of
each epoch waited, logged by rank 0) from the run's MLflow store and prints one JSON line; then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlflow

from hvd.config import load_config
from hvd.train.warm_start import EXPERIMENT, model_name, pretrain, warm_start_fingerprint


def measure(overrides: list[str], lead: int, out: Path) -> dict:
    """One warm start with `data.next_epoch_lead=lead`: its epochs' first-step waits and its wall time."""
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    cfg = load_config(None, [f"pretrain.out={out}", f"tracking.uri={uri}", *overrides, f"data.next_epoch_lead={lead}"])
    weights = out / f"{model_name(cfg)}-{warm_start_fingerprint(cfg)}.safetensors"
    for done in (weights, weights.with_suffix(".json")):  # train afresh: the stills stay
        done.unlink(missing_ok=True)
    started = time.perf_counter()
    pretrain(cfg)
    wall_s = time.perf_counter() - started
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    waits = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/epoch_start_wait_s"))
    return {"lead": lead, "run_id": run.info.run_id, "epoch_start_wait_s": [round(w, 2) for _, w in waits],
            "wall_s": round(wall_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leads", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--repeats", type=int, default=2, help="runs per lead, alternating with the others")
    parser.add_argument("--out", type=Path, default=Path("data/bench-epoch-starts"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    overrides = ["pretrain.train_stills=5120", "pretrain.val_stills=256", "pretrain.epochs=4", *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):  # there and back, so drifting load hits every lead alike
        for lead in args.leads if repeat % 2 == 0 else reversed(args.leads):
            runs.append(measure(overrides, lead, args.out))
            print(json.dumps(runs[-1]), flush=True)
    print("\n| data.next_epoch_lead | first epoch's first step, s | later epochs' first steps, s (median) | wall s |")
    print("|---|---|---|---|")
    for lead in args.leads:
        mine = [run for run in runs if run["lead"] == lead]
        later = [w for run in mine for w in run["epoch_start_wait_s"][1:]]
        print(f"| {lead} | {', '.join(str(run['epoch_start_wait_s'][0]) for run in mine)} | "
              f"{', '.join(str(w) for w in later)} ({statistics.median(later):.2f}) | "
              f"{', '.join(str(run['wall_s']) for run in mine)} |")


if __name__ == "__main__":
    main()
