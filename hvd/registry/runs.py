"""MLflow runs: where they live, one run per training run (resumes included), and their lifecycle.

The driver owns the run's lifecycle (create or resume, params, tags, registration); rank 0 of the
training workers only appends metrics to it, so a restarted worker group never starts a second run.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, SourceType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from hvd.config import RESUME_FREE_KEYS, Config, flatten, to_yaml, upgrade_keys
from hvd.data.folders import LockHeld, exclusive, hold
from hvd.errors import HvdError, InputError
from hvd.runtime.paths import resolve_tracking_uri
from hvd.runtime.stopping import stopped

DEFAULT_URI = "sqlite:///mlflow.db"
CONFIG_ARTIFACT = "config.yaml"


def tracking_uri(cfg: Config) -> str:
    """`MLFLOW_TRACKING_URI`, else the config, else a SQLite file under the project root (`HVD_ROOT`).

    A relative SQLite path is made absolute under that root, because Ray workers do not share the
    driver's cwd.
    """
    return resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or DEFAULT_URI)


@contextlib.contextmanager
def active_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for a block, then put the process's setting back.

    `mlflow.set_tracking_uri` also writes `MLFLOW_TRACKING_URI`, which `tracking_uri` reads first: left
    in place, the first run's store would silently win over every later config in the same process.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            mlflow.set_tracking_uri(previous)


UI_ADDRESS = "http://127.0.0.1:5000"  # where `ui_command` serves a local store


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


# MLflow 3.17's UI shows every experiment as GenAI (traces, "Evaluation runs") until the user flips its
# GenAI / Model training switch, which it keeps in the browser and takes from this query parameter; it
# ignores EXPERIMENT_KIND_TAG. Links we print carry the parameter, so they open on runs and the registry.
UI_VIEW = "?workflowType=machine_learning"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (model-training view): on the tracking server, or on `ui_command`'s local UI."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{UI_VIEW}"


def command_line() -> str:
    """This process's command as typed: `python pipelines/train.py k=v ...`, or `hvd train k=v ...` (whose
    `argv[0]` the `hvd` entry point sets to `hvd train`)."""
    program = sys.argv[0].split() if sys.argv[0].startswith("hvd ") else ["python", sys.argv[0]]
    return shlex.join([*program, *sys.argv[1:]])


def source_tags(description: str) -> dict[str, str]:
    """MLflow's standard tags: the command, who ran it, at which commit, and a description (the UI's notes)."""
    commit = git_commit()
    return {
        MLFLOW_SOURCE_NAME: sys.argv[0] or "python",
        MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
        MLFLOW_USER: getpass.getuser(),
        MLFLOW_GIT_COMMIT: commit,
        MLFLOW_RUN_NOTE: f"{description}\n\nCommand: {command_line()}",
        "git_commit": commit,
    }


def benchmark_input(name: str, fingerprint: str, manifest: str, splits: dict[str, int], context: str) -> DatasetInput:
    """The benchmark as an MLflow dataset input: its manifest, fingerprint and split sizes."""
    dataset = Dataset(
        name=name,
        digest=fingerprint[:36],
        source_type="local",
        source=json.dumps({"uri": manifest}),
        profile=json.dumps({"videos_per_split": splits}),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str
    resumed: bool


BATCH_LIMIT = 100  # params per MLflow log_batch call (metrics allow more; one limit keeps it simple)


# What kind of work an experiment holds, for MLflow UIs that read it: ours train and evaluate models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning"; GenAI is "genai_development"


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment called `name`, created if it does not exist yet, tagged a model-training experiment.

    An experiment made before the tag, or one whose kind a UI only guessed (`..._inferred`,
    `no_inferred_type`), gets it too; a kind someone chose stays.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    kind = experiment.tags.get(EXPERIMENT_KIND_TAG, "")
    if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    values = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(values), BATCH_LIMIT):
        client.log_batch(run_id, params=values[start : start + BATCH_LIMIT])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: dict[str, float], step: int, model_id: str | None = None
) -> None:
    """Metrics at one step; with `model_id` they also belong to that logged model (shown on its page)."""
    timestamp = int(mlflow.utils.time.get_current_time_millis())
    values = [Metric(key, float(value), timestamp, step, model_id=model_id) for key, value in metrics.items()]
    for start in range(0, len(values), BATCH_LIMIT):
        client.log_batch(run_id, metrics=values[start : start + BATCH_LIMIT])


class RunConfigMismatch(InputError, ValueError):
    """Resuming would train with one config while MLflow records another; the message lists the keys."""


def config_differences(logged: dict[str, str], cfg: Config) -> list[str]:
    """`key: logged -> now` for every training setting of `cfg` that differs from a run's logged params.

    A key the run never logged (added to the config after it started) counts only when set away from its
    default: the run's code behaved as the default does.
    """
    defaults = {key: str(value) for key, value in flatten(Config()).items()}
    now = {key: str(value) for key, value in flatten(cfg).items() if key not in RESUME_FREE_KEYS}
    logged = upgrade_keys(logged)  # a run started by an earlier version logged some keys under older names
    return [f"{key}: {logged.get(key, '(absent)')} -> {value}" for key, value in now.items()
            if logged.get(key, defaults[key]) != value]


class RunBusy(HvdError, RuntimeError):
    """The run `run.resume=auto` would resume is being trained by another live driver; the message names it."""


DRIVER_LOCK = ".driver.lock"  # in the run's Ray storage folder, held by the driver training the run
DRIVER_TAG = "driver"  # "pid N on HOST since ...": the driver that last trained the run
HEARTBEAT_TAG = "driver_heartbeat"  # seconds since the epoch, refreshed while a driver trains (non-local storage)
HEARTBEAT_S = 30.0
HEARTBEAT_STALE_S = 3 * HEARTBEAT_S  # older than this, the driver is taken for dead


def ray_name(run_name: str, run_id: str) -> str:
    """Ray Train's name for an MLflow run, its folder under `train.storage_path`: one Ray run per MLflow run."""
    return f"{run_name}-{run_id[:8]}"


def _local_storage(storage: str) -> Path | None:
    """`train.storage_path` as a local folder, None for a URI (`s3://...`) that `flock` cannot lock."""
    parsed = urlparse(storage)
    if parsed.scheme == "file":
        return Path(parsed.path)
    return Path(storage) if not parsed.scheme else None


class _Lease(Protocol):
    def release(self) -> None: ...


class _FileLease:
    """An exclusive `flock` on the run's lock file: the kernel drops it when the driver dies, however it dies."""

    def __init__(self, lock: Path, run_name: str, run_id: str):
        try:
            self.file = hold(lock)
        except LockHeld as held:
            raise RunBusy(_busy(run_name, run_id, f"{held}; lock {lock}")) from None

    def release(self) -> None:
        self.file.close()


class _Heartbeat:
    """A heartbeat tag on the run, refreshed from a daemon thread, where storage is not a local folder; a
    driver killed outright stops beating, and its run is free again after `HEARTBEAT_STALE_S`."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.stop = threading.Event()
        thread = threading.Thread(target=self._beat, args=(client, run_id), name="hvd-run-heartbeat", daemon=True)
        thread.start()

    def _beat(self, client: MlflowClient, run_id: str) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a beat lost to the network is retried at the next one
                client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")

    def release(self) -> None:
        self.stop.set()


_leases: dict[str, _Lease] = {}  # run id -> this process's claim to drive it, released by `finish_run`


def _busy(run_name: str, run_id: str, holder: str) -> str:
    return (f"run.name={run_name}: its unfinished MLflow run {run_id} is being trained right now by another driver "
            f"({holder}). Resuming it would make two drivers write one run: wait for that driver to end, stop it "
            "(SIGTERM ends its run KILLED), or pass run.resume=never (or another run.name) to start a new run")


def _driver_tags(heartbeat: bool) -> dict[str, str]:
    tags = {DRIVER_TAG: f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"}
    return tags | ({HEARTBEAT_TAG: f"{time.time():.0f}"} if heartbeat else {})


def _lease(client: MlflowClient, cfg: Config, run: Any, storage: Path | None, new: bool) -> _Lease:
    """Claim the run for this driver until `finish_run`, or raise `RunBusy` naming the live driver that has it."""
    run_id = run.info.run_id
    if storage is not None:
        return _FileLease(storage / ray_name(cfg.run.name, run_id) / DRIVER_LOCK, cfg.run.name, run_id)
    age = max(0.0, time.time() - float(run.data.tags.get(HEARTBEAT_TAG, 0)))  # the tag is rounded to a second
    if not new and run.info.status == "RUNNING" and age < HEARTBEAT_STALE_S:
        driver = run.data.tags.get(DRIVER_TAG, "a driver")
        raise RunBusy(_busy(cfg.run.name, run_id, f"{driver}, heartbeat {age:.0f} s ago"))
    return _Heartbeat(client, run_id)


def start_or_resume_run(cfg: Config, tags: dict[str, str], dataset: DatasetInput | None = None) -> TrackedRun:
    """The unfinished run named `cfg.run.name` if there is one and it started with this config (a resume),
    else a new run with params, `tags` and the benchmark as its dataset input. `run.resume=never` always
    starts a new run; an unfinished run with other settings is refused, never resumed under them, and so is
    one that another live driver is training (`RunBusy`).

    The driver keeps the run until `finish_run`: with local `train.storage_path`, by an exclusive lock on
    `DRIVER_LOCK` in the run's Ray storage folder (choosing a run and locking it happen under a lock of
    the run name, so two drivers starting at once cannot both take one run); with a URI, by a heartbeat tag.
    """
    client = MlflowClient(tracking_uri(cfg))
    experiment = experiment_id(client, cfg.tracking.experiment)
    storage = _local_storage(cfg.train.storage_path)
    choosing = exclusive(storage / cfg.run.name, "driver choosing a run") if storage else contextlib.nullcontext()
    with choosing:
        unfinished = [] if cfg.run.resume == "never" else client.search_runs(
            [experiment],
            filter_string=f"tags.mlflow.runName = '{cfg.run.name}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if unfinished:
            run = unfinished[0]
            lease = _lease(client, cfg, run, storage, new=False)
            if differing := config_differences(run.data.params, cfg):
                lease.release()
                raise RunConfigMismatch(
                    f"run.name={cfg.run.name}: its unfinished MLflow run {run.info.run_id} ({run.info.status}) started "
                    f"with other settings ({'; '.join(differing)}). Resuming it would train with one config while "
                    "MLflow records another: run it with its own settings to resume it, or pass run.resume=never (or "
                    "another run.name) to start a new run"
                )
            client.update_run(run.info.run_id, status="RUNNING")
            for key, value in _driver_tags(storage is None).items():
                client.set_tag(run.info.run_id, key, value)
            _leases[run.info.run_id] = lease
            return TrackedRun(run.info.run_id, experiment, resumed=True)
        run = client.create_run(experiment, run_name=cfg.run.name, tags={**tags, **_driver_tags(storage is None)})
        _leases[run.info.run_id] = _lease(client, cfg, run, storage, new=True)
    if dataset is not None:
        client.log_inputs(run.info.run_id, datasets=[dataset])
    log_params(client, run.info.run_id, flatten(cfg))
    client.log_text(run.info.run_id, to_yaml(cfg), CONFIG_ARTIFACT)
    return TrackedRun(run.info.run_id, experiment, resumed=False)


def finish_run(uri: str, run_id: str, failed: bool = False) -> None:
    """End a run FINISHED, or with `failed` FAILED, or KILLED when called while handling what a stop signal
    raises (`hvd.runtime.stopping`: every `except BaseException` that closes a run then records why it ended). Frees
    the run for the next driver."""
    error = sys.exception()
    status = RunStatus.KILLED if failed and error is not None and stopped(error) else (
        RunStatus.FAILED if failed else RunStatus.FINISHED)
    try:
        MlflowClient(uri).set_terminated(run_id, status=RunStatus.to_string(status))
    finally:
        if (lease := _leases.pop(run_id, None)) is not None:
            lease.release()


@contextlib.contextmanager
def closing_run(uri: str, run_id: str) -> Iterator[None]:
    """The one way a run ends: FINISHED when the block completes, FAILED when it raises, KILLED when a stop
    signal ends it (`finish_run`); no exit leaves a run RUNNING."""
    try:
        yield
    except BaseException:
        finish_run(uri, run_id, failed=True)
        raise
    finish_run(uri, run_id)


class MetricLogger:
    """Appends metrics to a run from a training worker, never twice for the same key and step.

    After a restart from a checkpoint the loop replays steps that were logged before the crash; the
    last logged step per key is read once, and those replays are dropped.
    """

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.last_step = {key: self._last_step(key) for key in self.client.get_run(run_id).data.metrics}

    def _last_step(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.last_step.get(k, -1)}
        if not fresh:
            return
        timestamp = int(mlflow.utils.time.get_current_time_millis())
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in fresh.items()])
        self.last_step.update(dict.fromkeys(fresh, step))
