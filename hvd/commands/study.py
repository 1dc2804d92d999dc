"""The mechanism study: HVD against the other heads over event brevity x entity size, a Ray Tune grid.

    python pipelines/study.py --grid smoke|pilot|default|heads|hcmi|family|ablation|scopes|keep|select|full
                              [--config configs/NAME.yaml] [key=value ...]
    python pipelines/study.py --grid NAME --seeds 1,2 [...]   # only these seeds' trials, a parent run of their own
    python pipelines/study.py --grid NAME --heads A,B [...]   # only these heads' (or variants') trials, likewise
    python pipelines/study.py --grid NAME --resume PARENT_RUN_ID [the study's config and overrides]
    python pipelines/study.py --report PARENT_RUN_ID [tracking.uri=...]

Each trial trains and tests one (event_fraction, entity_scale, head, seed) end to end as an MLflow child
run, from its seed's own warm start; the parent run (experiment study-<grid>) holds the summary tables
(summary.md: test t2v R@1 and, where logged, the mechanism metrics) and the plot (study.png). `smoke`
takes minutes, `pilot` about 15 minutes, `default` about 2.5 hours and `family` (every head, 3 cells) about
3.5 hours on 2 cores; `heads`, `hcmi`, `ablation` (HVD's frame x patch retention), `scopes` (PFCM's scope),
`keep` (HVD's frame retention where events are longer) and `select` (FFSM's rule) are single-question grids,
`full` is sized for a cluster. `--resume` runs only the trials a stopped study has not finished, under its parent run, after
checking that the config is the one its trials trained with.
`--seeds` and `--heads` run a long grid in pieces, e.g. one seed per working session where the store does not
outlive it.
`--report` summarises a study's finished trials onto its parent run again, running nothing.
"""

from __future__ import annotations

import argparse

from hvd.cli import parse_args
from hvd.config import ConfigError
from hvd.train.grids import GRIDS

SECTIONS = ("run", "synthetic", "data", "model", "pretrain", "train", "eval", "tracking")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", choices=tuple(GRIDS), default="smoke", help="which grid to run (default: smoke)")
    parser.add_argument("--seeds", type=seed_list, metavar="S[,S...]",
                        help="run only these of the grid's seeds, under a parent run of their own")
    parser.add_argument("--heads", type=lambda text: tuple(text.split(",")), metavar="H[,H...]",
                        help="run only these of the grid's heads or head variants, under a parent run of their own")
    parser.add_argument("--resume", metavar="RUN_ID", help="run this parent run's unfinished trials, then summarise")
    parser.add_argument("--report", metavar="RUN_ID", help="summarise this parent run's finished trials; run nothing")


def seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds, e.g. 1,2") from None


def main(argv: list[str] | None = None) -> None:
    # The grid's own overrides (its trial size) come first, so the command line can still change them.
    cfg, args = parse_args(__doc__, SECTIONS, argv, add_flags=add_flags,
                           flag_overrides=lambda a: list(GRIDS[a.grid].overrides))
    if (args.seeds or args.heads) and args.resume:
        raise ConfigError("--seeds/--heads and --resume: a resumed study runs the trials its parent run was started with")
    # the study's imports (Ray Tune, MLflow, torch) only once the arguments are good: see hvd.cli
    from mlflow.tracking import MlflowClient

    from hvd.registry.runs import tracking_uri, ui_command
    from hvd.train.study import report, run_study, summary_table

    if args.report:
        parent, cells = args.report, report(MlflowClient(tracking_uri(cfg)), args.report)
    else:
        parent, cells = run_study(cfg, args.grid, resume=args.resume, seeds=args.seeds, heads=args.heads)
    print(f"\nstudy: parent MLflow run {parent}\n{summary_table(cells)}")
    print(f"MLflow UI       {ui_command(tracking_uri(cfg))}")

