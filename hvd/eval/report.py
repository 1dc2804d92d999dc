"""The evaluation's outputs: a printed table, a JSON file, and an MLflow run in `eval/<benchmark>`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput
from mlflow.tracking import MlflowClient

from hvd.config import Config, flatten
from hvd.eval.mechanism import PREFIX as MECHANISM
from hvd.registry.runs import experiment_id, log_metrics, log_params

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


def mlflow_metric_names(metrics: dict[str, float], split: str) -> dict[str, float]:
    """Retrieval and mechanism metrics under the split, as training logs its test metrics (`test/t2v/R1`), so a
    training run and the evaluations of its model line up in MLflow's compare view; counts and timings as they are."""
    prefixed = ("t2v/", "v2t/", MECHANISM, "stage1/")
    return {(f"{split}/{key}" if any(p in key for p in prefixed) else key): value for key, value in metrics.items()}


@dataclass(frozen=True)
class EvalRun:
    run_id: str
    experiment_id: str


def start_eval_run(
    uri: str, cfg: Config, run_name: str, tags: dict[str, str], params: dict[str, str], dataset: DatasetInput
) -> EvalRun:
    """The evaluation's MLflow run in experiment `eval/<benchmark>`, opened as the work starts."""
    client = MlflowClient(uri)
    experiment = experiment_id(client, experiment_name(tags["benchmark"]))
    run = client.create_run(experiment, run_name=run_name, tags=tags)
    values = {key: value for key, value in flatten(cfg).items() if key.split(".")[0] in ("eval", "data", "model")}
    log_params(client, run.info.run_id, {**values, **params})
    client.log_inputs(run.info.run_id, datasets=[dataset])
    return EvalRun(run.info.run_id, experiment)


def log_eval_results(
    uri: str, run_id: str, metrics: dict[str, float], artifacts: Iterable[Path], model_id: str | None
) -> None:
    """Metrics (on the evaluated model's page too, when it is a logged model) and artifacts of a job's run."""
    client = MlflowClient(uri)
    log_metrics(client, run_id, metrics, step=0, model_id=model_id)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
