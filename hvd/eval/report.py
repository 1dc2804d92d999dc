"""The evaluation's outputs: a printed table, a JSON file, and an MLflow run in `eval/<benchmark>`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from hvd.config import Config, flatten
from hvd.tracking import git_commit

COLUMNS = ("R1", "R5", "R10", "MdR", "MnR")
REPORT_FILE = "report.json"


def experiment_name(benchmark: str) -> str:
    return f"eval/{benchmark}"


def metric_table(metrics: dict[str, float], prefixes: Iterable[str]) -> str:
    """One row per direction (and per `prefix`, e.g. "" and "exhaustive/"), the peers' columns."""
    lines = [f"{'':<22}" + "".join(f"{name:>8}" for name in COLUMNS)]
    for prefix in prefixes:
        for direction in ("t2v", "v2t"):
            for variant in ("", "dsl_"):
                keys = [f"{prefix}{direction}/{variant}{name}" for name in COLUMNS]
                if all(key in metrics for key in keys):
                    label = f"{prefix}{direction}{' dsl' if variant else ''}"
                    lines.append(f"{label:<22}" + "".join(f"{metrics[key]:8.2f}" for key in keys))
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def log_eval_run(
    uri: str,
    cfg: Config,
    run_name: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    artifacts: Iterable[Path],
) -> str:
    """A finished MLflow run in experiment `eval/<benchmark>` with the config as params; its id."""
    client = MlflowClient(uri)
    name = experiment_name(tags["benchmark"])
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=run_name, tags={"git_commit": git_commit(), **tags})
    run_id = run.info.run_id
    params = [
        Param(key, str(value))
        for key, value in flatten(cfg).items()
        if key.split(".")[0] in ("eval", "data", "model")
    ]
    timestamp = int(mlflow.utils.time.get_current_time_millis())
    values = [Metric(key, float(value), timestamp, 0) for key, value in metrics.items()]
    for start in range(0, max(len(params), len(values)), 100):
        client.log_batch(run_id, metrics=values[start : start + 100], params=params[start : start + 100])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id
