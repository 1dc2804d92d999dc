"""The mechanism study: does HVD beat mean pooling where events are brief and entities small?

A Ray Tune grid over cells (`synthetic.event_fraction`, `synthetic.entity_scale`) x `model.head` (or a head
variant) x seed. Every trial is the whole chain (benchmark -> shards -> warm start -> train -> test,
`hvd.train.fit`); the benchmark and its shards are cached per cell, so heads and seeds share them, and each
seed has its own warm start (`pretrain.seed`), shared by every cell and head, so the spread over seeds
includes the warm start's. Trials run one at a time: each is itself a data-parallel Ray Train run that
takes the CPUs a small machine has. Every trial is an MLflow child run of one parent run, which holds the
summary tables (test R@1 and, where the benchmark has ground truth, the mechanism metrics of
`hvd.eval.mechanism`) and the plot (`hvd.train.plots.study_figure`).
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import logging
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from hvd.config import Config, ConfigError, config_from_yaml, replace_keys, to_yaml
from hvd.registry.runs import (
    RunConfigMismatch,
    closing_run,
    config_differences,
    experiment_id,
    log_metrics,
    log_params,
    source_tags,
    tracking_uri,
)
from hvd.runtime.cluster import ensure_ray
from hvd.runtime.stopping import stop_on_signals
from hvd.train.fit import fit
from hvd.train.grids import GRIDS, RETENTION, VARIANTS, Grid
from hvd.train.plots import mechanism_figure, plt, retention_figure, study_figure
from hvd.train.warm_start import warm_start

logger = logging.getLogger(__name__)


# What a trial's own process reserves: no CPU (it only waits on its Ray Train run, whose workers and Ray Data
# tasks need every CPU of a small machine) but some memory, as Tune refuses an empty request.
TRIAL_RESOURCES = {"memory": 256 * 2**20}
KNOBS = ("event_fraction", "entity_scale", "head", "seed")
METRICS = ("test/t2v/R1", "test/t2v/R5", "test/v2t/R1", "test/v2t/R5")
# What evaluation logs as test/mechanism/<name> where the benchmark has ground truth (`hvd.eval.mechanism`);
# a head logs those its mechanism has (the entity ones: heads with PFCM entities).
MECHANISM = ("frame_recall", "frame_precision", "event_mass", "event_share", "entity_purity", "entity_split")


def trial_config(base: Config, study: str, params: dict[str, Any]) -> Config:
    """The base config with one trial's knobs; benchmark and shards are named by the cell, not the trial, and
    the warm start by the seed (`pretrain.seed`), so every trial of a seed shares one."""
    ef, es = params["event_fraction"], params["entity_scale"]
    root = Path(base.synthetic.out).parent / f"study-{study}"
    cell = f"ef{ef}-es{es}"
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, name=f"{study}-{cell}-{params['head']}-s{params['seed']}", seed=params["seed"]),
        pretrain=dataclasses.replace(base.pretrain, seed=params["seed"]),
        synthetic=dataclasses.replace(base.synthetic, event_fraction=ef, entity_scale=es, out=str(root / f"bench-{cell}")),
        data=dataclasses.replace(base.data, shards=str(root / f"shards-{cell}")),
        model=replace_keys(base.model, VARIANTS.get(params["head"], {"head": params["head"]})),
        tracking=dataclasses.replace(base.tracking, experiment=f"study-{study}", model_name=f"study-{study}"),
    )


def run_trial(params: dict[str, Any]) -> None:
    """One Tune trial: the whole chain for one (cell, head, seed), reported to Tune and MLflow."""
    params = params | params["trial"]
    cfg = trial_config(config_from_yaml(params["config"]), params["study"], params)
    knobs = {key: str(params[key]) for key in KNOBS}
    outcome = fit(cfg, tags={"mlflow.parentRunId": params["parent_run_id"], "study": params["study"], **knobs})
    tune.report({key.replace("/", "_"): outcome.test.get(key.removeprefix("test/"), float("nan")) for key in METRICS}
                | {f"mechanism_{name}": outcome.test.get(f"mechanism/{name}", float("nan")) for name in MECHANISM}
                | {"ceiling": outcome.ceiling if outcome.ceiling is not None else float("nan"), "run_id": outcome.run_id})


@dataclass(frozen=True)
class Cell:
    event_fraction: float
    entity_scale: float
    head: str
    t2v_r1: list[float]
    # each of MECHANISM: its mean over the seeds that logged it; None where none did
    mechanism: dict[str, float | None] = dataclasses.field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.t2v_r1)

    @property
    def std(self) -> float:
        return statistics.stdev(self.t2v_r1) if len(self.t2v_r1) > 1 else 0.0


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values logged; None where no seed logged one."""
    logged = [v for v in values if v is not None]
    return statistics.fmean(logged) if logged else None


def summarise(rows: list[dict[str, Any]]) -> list[Cell]:
    """Trials grouped by (event_fraction, entity_scale, head): test t2v R@1 and the mechanism metrics over seeds."""
    cells = []
    key = lambda r: (r["event_fraction"], r["entity_scale"], r["head"])  # noqa: E731
    for (ef, es, head), group in itertools.groupby(sorted(rows, key=key), key=key):
        runs = list(group)
        mechanism = {name: _mean([r.get(name) for r in runs]) for name in MECHANISM}
        cells.append(Cell(ef, es, head, [r["test_t2v_R1"] for r in runs], mechanism))
    return cells


def summary_table(cells: list[Cell]) -> str:
    """Markdown: test t2v R@1, one row per (event_fraction, entity_scale) and a mean +- std column per head; then
    where any trial logged a mechanism metric, one row per (cell, head) with R@1 beside what the head selected."""
    heads = sorted({c.head for c in cells})
    lines = ["| event_fraction | entity_scale | " + " | ".join(f"{h} t2v R@1" for h in heads) + " |",
             "|---|---|" + "---|" * len(heads)]
    by_cell = {(c.event_fraction, c.entity_scale, c.head): c for c in cells}
    for ef, es in sorted({(c.event_fraction, c.entity_scale) for c in cells}):
        values = [by_cell.get((ef, es, h)) for h in heads]
        shown = [f"{c.mean:.1f} +- {c.std:.1f} (n={len(c.t2v_r1)})" if c else "-" for c in values]
        lines.append(f"| {ef} | {es} | " + " | ".join(shown) + " |")
    if any(v is not None for c in cells for v in c.mechanism.values()):
        lines += ["", "| event_fraction | entity_scale | head | t2v R@1 | "
                  + " | ".join(name.replace("_", " ") for name in MECHANISM) + " |",
                  "|---|---|---|---|" + "---|" * len(MECHANISM)]
        for c in sorted(cells, key=lambda c: (c.event_fraction, c.entity_scale, c.head)):
            shown = [f"{v:.2f}" if (v := c.mechanism.get(name)) is not None else "-" for name in MECHANISM]
            lines.append(f"| {c.event_fraction} | {c.entity_scale} | {c.head} | {c.mean:.1f} +- {c.std:.1f} | "
                         + " | ".join(shown) + " |")
    return "\n".join(lines)


def grid_of(study: str, seeds: tuple[int, ...] | None = None, heads: tuple[str, ...] | None = None) -> Grid:
    """Grid `study`, or only its trials of `seeds` and `heads`: a long grid run in pieces (one parent run each)
    where the store does not outlive a working session."""
    grid = GRIDS[study]
    for flag, wanted, have in (("--seeds", seeds, grid.seed), ("--heads", heads, grid.head)):
        if wanted is not None and (unknown := [w for w in wanted if w not in have]):
            raise ConfigError(f"{flag} {','.join(map(str, wanted))}: grid '{study}' has {flag[2:]} {have}, "
                              f"not {unknown}")
    return dataclasses.replace(grid, seed=tuple(s for s in grid.seed if seeds is None or s in seeds),
                               head=tuple(h for h in grid.head if heads is None or h in heads))


def parent_grid(client: MlflowClient, study: str, parent: str) -> Grid:
    """The grid parent run `parent` was started with: its seeds and heads are logged as `grid.seed`, `grid.head`."""
    params = client.get_run(parent).data.params
    return grid_of(study, ast.literal_eval(params["grid.seed"]), ast.literal_eval(params["grid.head"]))


def start_parent(client: MlflowClient, study: str, grid: Grid) -> str:
    experiment = experiment_id(client, f"study-{study}")
    description = (f"Mechanism study '{study}': {len(grid.trials)} trials, {len(grid.cells)} cells "
                   f"(event_fraction, entity_scale) x {len(grid.head)} heads x {len(grid.seed)} seeds; each trial "
                   "a child run.")
    parent = client.create_run(experiment, run_name=f"study-{study}", tags=source_tags(description)).info.run_id
    log_params(client, parent, {f"grid.{field.name}": str(getattr(grid, field.name)) for field in dataclasses.fields(grid)})
    return parent


def missing_trials(client: MlflowClient, base: Config, study: str, parent: str) -> list[dict[str, Any]]:
    """The trials of grid `study` that parent run `parent` has no finished child for, after checking that
    `base` is the config its children trained with (so the resumed trials are comparable)."""
    name = client.get_run(parent).info.run_name
    if name != f"study-{study}":
        raise ValueError(f"--resume {parent}: that run is '{name}', not a parent of grid '{study}'; "
                         f"pass the --grid it ran (e.g. --grid {name.removeprefix('study-')})")
    done = finished_children(client, parent)
    for child in done[:1]:
        knobs = {"event_fraction": float(child.data.tags["event_fraction"]),
                 "entity_scale": float(child.data.tags["entity_scale"]),
                 "head": child.data.tags["head"], "seed": int(child.data.tags["seed"])}
        # resolved as the trial resolves it: the logged model.pretrained is its seed's warm start file
        if differing := config_differences(child.data.params, warm_start(trial_config(base, study, knobs))):
            raise RunConfigMismatch(
                f"--resume {parent}: its trial run {child.info.run_id} trained with other settings "
                f"({'; '.join(differing)}); resume with the study's own config and overrides")
    finished = {(float(c.data.tags["event_fraction"]), float(c.data.tags["entity_scale"]), c.data.tags["head"],
                 int(c.data.tags["seed"])) for c in done}
    return [t for t in parent_grid(client, study, parent).trials if tuple(t[k] for k in KNOBS) not in finished]


def run_study(base: Config, study: str, resume: str | None = None, seeds: tuple[int, ...] | None = None,
              heads: tuple[str, ...] | None = None) -> tuple[str, list[Cell]]:
    """Run grid `study` (only its `seeds` and `heads`, if given) on `base` under one MLflow parent run, or only
    the trials that parent run `resume` has not finished; return the parent's id and the summary."""
    grid = grid_of(study, seeds, heads)  # seeds and heads the grid lacks are refused before any store or Ray starts
    uri = tracking_uri(base)
    # Pinned for the trials: Tune runs each in its own working directory, where a relative default would
    # give every child run a store of its own.
    base = dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, uri=uri))
    client = MlflowClient(uri)
    if resume:
        trials = missing_trials(client, base, study, resume)
        parent = resume
        client.update_run(parent, status="RUNNING")
        logger.info(f"study: resuming parent run {parent}: {len(trials)} of "
                    f"{len(parent_grid(client, study, parent).trials)} trials to run")
    else:
        trials, parent = grid.trials, start_parent(client, study, grid)
    space = {"config": to_yaml(base), "study": study, "parent_run_id": parent, "trial": tune.grid_search(trials)}
    # a resume is its own Tune experiment beside the first one, named by what it had left to run
    name = f"study-{study}-{parent[:8]}" + (f"-resumed-{len(trials)}-left" if resume else "")
    with closing_run(uri, parent):
        if trials:
            ensure_ray()
            stop_on_signals()  # again: ray.init put its own SIGTERM handler in place
            tuner = tune.Tuner(
                # the trial only drives; its Ray Train workers and Ray Data tasks hold the CPUs
                tune.with_resources(run_trial, TRIAL_RESOURCES),
                param_space=space,
                tune_config=tune.TuneConfig(max_concurrent_trials=1),
                run_config=tune.RunConfig(name=name, storage_path=base.train.storage_path, verbose=0),
            )
            failed = [r.error for r in tuner.fit() if r.error is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(trials)} study trials failed; the first: {failed[0]}")
        cells = report(client, parent)
    return parent, cells


def finished_children(client: MlflowClient, parent: str) -> list[Any]:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'",
                              max_results=10_000)


def finished_trials(client: MlflowClient, parent: str) -> list[dict[str, Any]]:
    """The parent run's finished child runs as summary rows: their knobs (tags), test t2v R@1 and each of
    MECHANISM (None where the trial did not log it)."""
    runs = finished_children(client, parent)
    return [{"event_fraction": float(run.data.tags["event_fraction"]), "entity_scale": float(run.data.tags["entity_scale"]),
             "head": run.data.tags["head"], "seed": int(run.data.tags["seed"]),
             "test_t2v_R1": run.data.metrics["test/t2v/R1"]}
            | {name: run.data.metrics.get(f"test/mechanism/{name}") for name in MECHANISM} for run in runs]


def report(client: MlflowClient, parent: str) -> list[Cell]:
    """Summarise the parent's finished trials onto it: summary.md, study.png (a retention grid for the
    ablation), mechanism.png where trials logged mechanism metrics, and per-cell metrics.

    Also what `pipelines/study.py --report RUN_ID` runs for a study stopped before its last trial.
    """
    rows = finished_trials(client, parent)
    cells = summarise(rows)
    study = client.get_run(parent).info.run_name.removeprefix("study-")
    client.log_text(parent, summary_table(cells) + "\n", "summary.md")
    figures = {"study.png": study_figure(cells, title=f"study '{study}': test t2v R@1, mean and std over seeds")}
    if {c.head for c in cells} <= set(RETENTION):  # the paper's Table 4 as a grid
        retention = {name: (keys["hvd.frame_keep"], keys["hvd.pfcm_ratio"]) for name, keys in RETENTION.items()}
        figures["study.png"] = retention_figure(
            cells, retention, f"study '{study}': HVD's test t2v R@1 by frame and patch retention, over seeds")
    if any(v is not None for c in cells for v in c.mechanism.values()):
        figures["mechanism.png"] = mechanism_figure(cells, f"study '{study}': where each head looked, means over seeds")
    with tempfile.TemporaryDirectory() as tmp:
        for name, figure in figures.items():
            figure.savefig(Path(tmp) / name, dpi=110)
            plt.close(figure)
            client.log_artifact(parent, str(Path(tmp) / name))
    summary = {}
    for cell in cells:
        name = f"{cell.head}/ef{cell.event_fraction}_es{cell.entity_scale}"
        summary |= {f"{name}/t2v_R1_mean": cell.mean, f"{name}/t2v_R1_std": cell.std}
        summary |= {f"{name}/{metric}_mean": value for metric, value in cell.mechanism.items() if value is not None}
    log_metrics(client, parent, summary, step=0)
    client.set_tag(parent, "trials_reported", str(len(rows)))
    return cells
