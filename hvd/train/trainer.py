"""The driver side of training: prepared shards -> MLflow run -> Ray Train fit -> test -> register."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer

from hvd.checkpoint import load_state
from hvd.config import WARM_START, Config
from hvd.data.manifest import fingerprint
from hvd.data.prepare import prepare
from hvd.data.shards import ShardSummary, read_shards
from hvd.data.synthetic import generate, read_ceiling
from hvd.errors import HvdError
from hvd.eval.encode import evaluate_split
from hvd.eval.mechanism import mechanism_metrics
from hvd.model import RetrievalModel, build_model, build_tokenizer
from hvd.registry.models import RegisteredModel, register_model, scored_on
from hvd.registry.runs import (
    TrackedRun,
    benchmark_input,
    closing_run,
    log_metrics,
    ray_name,
    run_url,
    source_tags,
    start_or_resume_run,
    tracking_uri,
)
from hvd.runtime.cluster import ensure_ray
from hvd.runtime.paths import require_shared_paths
from hvd.runtime.stopping import stop_on_signals
from hvd.runtime.worker_setup import verbose
from hvd.train.entry import train_loop_per_worker
from hvd.train.inputs import caption_passes, training_datasets
from hvd.train.loop import RESUMED_METRIC, SCORE_KEY, WorkerPlan
from hvd.train.plots import log_training_curves
from hvd.train.rendezvous import LoopbackTorchConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Restart:
    step: int  # the checkpoint's step the worker group resumed from
    time_s: float  # when, seconds since the epoch


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    run_url: str
    model: RegisteredModel
    val: dict[str, float]
    test: dict[str, float]
    restarts: list[Restart]
    network: RetrievalModel  # the registered weights, in memory
    ceiling: float | None = None  # a synthetic benchmark's oracle test t2v R@1 (hvd.data.synthetic)


@dataclass(frozen=True)
class TrainingData:
    """Prepared shards, and what MLflow records about where they came from."""

    shards: Path
    benchmark: str  # the dataset's name in MLflow
    fingerprint: str
    source: str  # the manifest, or whatever else wrote the shards
    ceiling: float | None = None  # a synthetic benchmark's oracle test t2v R@1


class TrainingFailed(HvdError, RuntimeError):
    """Training stopped after its restarts ran out; the message names the cause on each failed worker."""


def failure_summary(err: TrainingFailedError) -> str:
    """One line per failed worker: its exception type and the last line of its message, not three tracebacks."""
    failures = getattr(err, "worker_failures", None) or {"controller": getattr(err, "controller_failure", err)}
    lines = []
    for rank, failure in sorted(failures.items(), key=lambda item: str(item[0])):
        message = str(failure).strip().splitlines()
        last = message[-1] if message else ""
        if "Connection closed by peer" in last or "Connection reset by peer" in last:
            last = "its peer's connection closed: a symptom, another worker died first (its log says why)"
        lines.append(f"worker {rank}: {type(failure).__name__}: {last}")
    return "; ".join(lines)


def ray_log_dir() -> str:
    """Where this Ray session keeps every process's log: the place to read a failed worker's traceback."""
    try:
        return f"{ray._private.worker._global_node.get_session_dir_path()}/logs"
    except AttributeError:  # not connected, or a client connection
        return "the Ray session's logs folder (ray logs --help)"


def prepare_data(cfg: Config) -> TrainingData:
    """The benchmark's shards: the synthetic benchmark when no manifest is given; both steps are cached."""
    ensure_ray()
    require_shared_paths({
        "data.manifest": cfg.data.manifest, "synthetic.out": None if cfg.data.manifest else cfg.synthetic.out,
        "data.shards": cfg.data.shards, "model.pretrained": cfg.model.pretrained,
        "train.storage_path": cfg.train.storage_path, "tracking.uri": tracking_uri(cfg),
    })
    manifest = Path(cfg.data.manifest) if cfg.data.manifest else generate(cfg.synthetic)
    logger.info("%s", prepare(cfg, manifest, Path(cfg.data.shards), overwrite=cfg.data.overwrite))
    return TrainingData(Path(cfg.data.shards), manifest.resolve().parent.name, fingerprint(manifest), str(manifest),
                        read_ceiling(manifest).get("test"))


def steps_per_epoch(cfg: Config, train_samples: int) -> int:
    """Batches each worker trains per pass over `train_samples` rows: Ray Data splits the rows equally,
    drop_last drops the rest."""
    per_worker_batch = cfg.train.batch_size // cfg.train.num_workers
    steps = (train_samples // cfg.train.num_workers) // per_worker_batch
    if steps == 0:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the {train_samples} training samples")
    return steps


def train(cfg: Config, data: TrainingData, tags: dict[str, str] | None = None) -> TrainOutcome:
    """Train on `data`'s train split with Ray Train, test the best checkpoint, register it; `cfg.model.pretrained`
    is a file or None here (`hvd.train.fit` resolves the synthetic warm start first). The stages, in order:
    open the MLflow run -> fit -> test -> register -> summary; a failure in any marks the run FAILED."""
    if cfg.model.pretrained == WARM_START:
        raise ValueError("model.pretrained=synthetic is made by hvd.train.warm_start before training; use hvd.train.fit")
    splits = ShardSummary.read(data.shards).splits
    val_split = "val" if splits.get("val") else "test"
    tracked = _open_run(cfg, data, splits, val_split, tags or {})
    uri = tracking_uri(cfg)
    with closing_run(uri, tracked.run_id):  # not FINISHED: the same command resumes it
        fit_started_ms = int(time.time() * 1000)
        passes = caption_passes(cfg, data.shards)
        steps = passes * steps_per_epoch(cfg, splits["train"])  # the summary read above, not read again
        model, step, val = _fit(cfg, data, tracked, val_split, passes, steps)
        test = _test(cfg, model, data, splits)
        registered = register_model(cfg, tracked.run_id, model, {f"val/{k}": v for k, v in val.items()},
                                    scored_on(data.benchmark, data.fingerprint, val_split), test)
        return _summary(cfg, data, tracked, registered, model, step, val, test, fit_started_ms)


def _open_run(cfg: Config, data: TrainingData, splits: dict[str, int], val_split: str, tags: dict[str, str]) -> TrackedRun:
    """The run's MLflow run: a new one, or the unfinished one of `run.name` whose config this is."""
    description = (
        f"{cfg.model.head} head on {cfg.model.preset} CLIP, trained on {data.benchmark} ({splits.get('train', 0)} "
        f"videos): {cfg.train.epochs} epochs of batch {cfg.train.batch_size} on {cfg.train.num_workers} workers."
    )
    tags = {"dataset_fingerprint": data.fingerprint, "head": cfg.model.head, "preset": cfg.model.preset,
            "val_split": val_split, **source_tags(description), **tags}
    stop_on_signals()  # again: ray.init put its own SIGTERM handler in place
    tracked = start_or_resume_run(
        cfg, tags, benchmark_input(data.benchmark, data.fingerprint, data.source, splits, "train")
    )
    how = f"resumed: the unfinished run named {cfg.run.name}, from its last checkpoint" if tracked.resumed else "new"
    logger.info(f"MLflow run {tracked.run_id} ({how}) at {tracking_uri(cfg)}")
    return tracked


def _fit(
    cfg: Config, data: TrainingData, tracked: TrackedRun, val_split: str, passes: int, steps: int
) -> tuple[RetrievalModel, int, dict[str, float]]:
    """Ray Train's fit, resumed from the run's last checkpoint if it has one; the best checkpoint by validation
    R@1 as a model, its step and its validation metrics."""
    storage = cfg.train.storage_path  # absolute or a URI since load_config, as workers have another cwd
    ray_run_name = ray_name(cfg.run.name, tracked.run_id)  # one Ray run per MLflow run: resume finds both
    # Ray Train also copies each print of a worker to its logger, so every line would reach the terminal twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    datasets = training_datasets(cfg, data.shards)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=WorkerPlan(
            cfg=cfg,
            run_id=tracked.run_id,
            tracking_uri=tracking_uri(cfg),
            shards=str(data.shards.resolve()),
            val_split=val_split,
            steps_per_epoch=steps,
            caption_passes=passes,
            datasets=tuple(datasets),
            fault_marker=f"{storage}/{ray_run_name}/.fault_injected",
        ).to_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {}), **cfg.train.worker_resources
            },
            placement_strategy=cfg.train.placement_strategy,
        ),
        torch_config=LoopbackTorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=ray_run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as err:  # `train` marks the run FAILED
        raise TrainingFailed(
            f"training failed: {failure_summary(err)}.\n"
            f"MLflow run {tracked.run_id} is marked FAILED; every worker's full log is under {ray_log_dir()}.\n"
            f"The same command (run.name={cfg.run.name}) resumes it from its last checkpoint."
        ) from err
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda pair: pair[1].get(SCORE_KEY, -1.0))
    with best_checkpoint.as_directory() as directory:
        state = load_state(directory)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    val = {k.removeprefix("val/"): v for k, v in best_metrics.items() if k.startswith("val/")}
    return model, state["step"], val


def _test(cfg: Config, model: RetrievalModel, data: TrainingData, splits: dict[str, int]) -> dict[str, float]:
    """The chosen model's metrics on the test split (none without one), with the mechanism metrics where the
    benchmark records its ground truth."""
    if not splits.get("test"):
        return {}
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)
    table = read_shards(data.shards, "test")
    return evaluate_split(model, table, tokenizer, cfg.eval.batch_size) | mechanism_metrics(
        model, tokenizer, table, cfg.eval.mechanism_videos)


def _summary(
    cfg: Config, data: TrainingData, tracked: TrackedRun, registered: RegisteredModel, model: RetrievalModel,
    step: int, val: dict[str, float], test: dict[str, float], fit_started_ms: int,
) -> TrainOutcome:
    """Test metrics (with the registered model), the curves, the ceiling and the restarts on the run."""
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    log_metrics(client, tracked.run_id, {f"test/{k}": v for k, v in test.items()}, step, model_id=registered.model_id)
    log_training_curves(uri, tracked.run_id)
    if data.ceiling is not None:
        client.set_tag(tracked.run_id, "oracle_test_t2v_R1_ceiling", str(data.ceiling))
    resumed = restarts(uri, tracked.run_id, fit_started_ms)
    client.set_tag(tracked.run_id, "restarts", str(len(resumed)))
    return TrainOutcome(tracked.run_id, uri, run_url(uri, tracked.experiment_id, tracked.run_id), registered, val, test,
                        resumed, model, data.ceiling)


def restarts(uri: str, run_id: str, since_ms: int) -> list[Restart]:
    """The worker group's restarts during this fit, from the step rank 0 logs each time it resumes."""
    history = MlflowClient(uri).get_metric_history(run_id, RESUMED_METRIC)
    return sorted(Restart(int(m.value), m.timestamp / 1000) for m in history if m.timestamp >= since_ms)

