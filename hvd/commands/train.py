"""Train HVD: benchmark -> prepared shards -> Ray Train -> test -> MLflow registry.

    python pipelines/train.py [--config configs/NAME.yaml] [key=value ...]
    ray job submit --working-dir . -- python pipelines/train.py train.num_workers=4 train.use_gpu=true

With no arguments it runs the embedded default end to end on the synthetic demo benchmark.
"""

from __future__ import annotations

import time

from hvd.cli import fail, parse_args
from hvd.errors import HvdError
from hvd.train.preflight import check_inputs

SECTIONS = ("run", "synthetic", "data", "model", "pretrain", "train", "eval", "tracking")


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(__doc__, SECTIONS, argv)
    try:
        check_inputs(cfg)  # what the run reads, in a second
    except HvdError as err:
        fail(err)
    # the job's imports (torch, Ray, MLflow) only once the arguments and inputs are good: see hvd.cli
    from hvd.eval.mechanism import mechanism_line
    from hvd.registry.runs import ui_command
    from hvd.train.fit import fit

    try:
        outcome = fit(cfg)
    except HvdError as err:  # each says what went wrong and what to do
        fail(err)
    model = outcome.model
    print(f"\nMLflow run      {outcome.run_id}")
    print(f"registered      {model.name} version {model.version}"
          + (f" (now the champion: models:/{model.name}@champion)" if model.champion else ""))
    if outcome.ceiling is not None:
        print(f"oracle ceiling  test t2v R@1 {outcome.ceiling:.1f} (an ideal model that sees the named attributes)")
    print(f"{'test':<15} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MdR':>6}")
    for direction in ("t2v", "v2t"):
        row = [outcome.test.get(f"{direction}/{k}", float("nan")) for k in ("R1", "R5", "R10", "MdR")]
        print(f"{direction:<15} " + " ".join(f"{v:6.1f}" for v in row))
    if mechanism := mechanism_line(outcome.test):
        print(f"looked at       {mechanism}")
    restarts = ", ".join(f"step {r.step} at {time.strftime('%H:%M:%S', time.localtime(r.time_s))}" for r in outcome.restarts)
    print(f"resumed         {len(outcome.restarts)} time(s) from a checkpoint{': ' + restarts if restarts else ''}")
    print(f"MLflow UI       {ui_command(outcome.tracking_uri)}")
    print(f"run page        {outcome.run_url}")

