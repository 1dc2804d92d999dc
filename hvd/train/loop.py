"""The training loop every Ray Train worker runs, readable top to bottom.

Each worker encodes its share of the global batch; the loss gathers features from all ranks (with
gradients), so every rank computes the same global-batch loss, and DistributedDataParallel's averaged
gradients equal the single-process gradient of that loss (tests/test_model_distributed.py). Frames
arrive decoded (`hvd.train.inputs`); rank 0 validates, logs to MLflow and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray.train
import ray.train.torch
import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from torch import Tensor, nn

from hvd.checkpoint import load_state, save_state
from hvd.config import Config, config_from_yaml, to_yaml
from hvd.data.shards import read_shards
from hvd.eval.encode import evaluate_split
from hvd.model import build_model, build_tokenizer
from hvd.registry.runs import MetricLogger
from hvd.runtime.worker_setup import quiet_logs
from hvd.train.inputs import EpochStream, epoch_batches
from hvd.train.optim import build_optimizer, build_scheduler
from hvd.train.step import PRECISIONS, train_step, use_fast_cuda_math

logger = logging.getLogger(__name__)

SCORE_KEY = "val_score"  # what the best checkpoint is chosen by: val t2v R@1, -1 for mid-epoch saves
RESUMED_METRIC = "train/resumed_from_step"  # logged by rank 0 each time the worker group resumes
LOG_EVERY_STEPS = 10  # MLflow
PROGRESS_LINES = 20  # about this many progress lines a run on the terminal, at multiples of LOG_EVERY_STEPS
T = TypeVar("T")


class NonFiniteTraining(FloatingPointError):
    """Too many steps in a row had a non-finite loss or gradient: training has diverged."""


def timed(batches: Iterator[T]) -> Iterator[tuple[float, T]]:
    """Each item with the seconds the loop waited for it: near zero while prefetching keeps up."""
    while True:
        started = time.perf_counter()
        try:
            item = next(batches)
        except StopIteration:
            return
        yield time.perf_counter() - started, item


def inject_fault(cfg: Config, step: int, rank: int, world_size: int, marker: Path) -> None:
    """Test-only: the last worker dies once at `train.fail_at_step`, as a lost node would.

    It dies only once Ray Train has registered every checkpoint reported before it, so that which
    checkpoint a restart resumes from is the same on a loaded machine as on an idle one.
    """
    if cfg.train.fail_at_step == step and rank == world_size - 1 and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
        logger.info(f"[fault injection] worker {rank} exits at step {step}")
        os._exit(1)


def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Report to Ray Train; with `state` (rank 0 only) also a checkpoint."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, **state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, decided once by the driver (`hvd.train.trainer.fit`)."""

    cfg: Config
    run_id: str
    tracking_uri: str
    shards: str
    val_split: str
    steps_per_epoch: int  # caption_passes passes of equal length
    fault_marker: str
    caption_passes: int = 1  # passes over the videos per epoch (hvd.train.inputs.caption_passes)
    datasets: tuple[str, ...] = ("train",)  # the Ray Train datasets the epochs take turns over (EPOCH_DATASETS)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    @property
    def print_every(self) -> int:
        return LOG_EVERY_STEPS * max(1, self.total_steps // (PROGRESS_LINES * LOG_EVERY_STEPS))

    @functools.cached_property
    def config_yaml(self) -> str:
        """The config as checkpoints and Ray Train carry it, rendered once."""
        return to_yaml(self.cfg)

    def to_loop_config(self) -> dict[str, Any]:
        """Plain values for Ray Train's `train_loop_config`, which Ray records as JSON."""
        return {**dataclasses.asdict(self), "cfg": self.config_yaml}

    @classmethod
    def from_loop_config(cls, values: dict[str, Any]) -> WorkerPlan:
        return cls(**{**values, "cfg": config_from_yaml(values["cfg"]), "datasets": tuple(values["datasets"])})


@dataclass
class Worker:
    """One worker's model, optimizer and place in the run; rank 0 also logs, validates and checkpoints."""

    plan: WorkerPlan
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    epoch: int = 0  # the epoch in progress
    best_score: float = -1.0
    skipped_steps: int = 0  # non-finite steps skipped since this worker started
    skipped_in_a_row: int = 0
    logger: MetricLogger | None = None
    grad_scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA

    def count_step(self, stepped: bool, loss: float, grad_norm: float) -> None:
        """Count a skipped (non-finite) step, warn, and stop the run after `train.max_skipped_steps` in a row."""
        if stepped:
            self.skipped_in_a_row = 0
            return
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        limit = self.plan.cfg.train.max_skipped_steps
        if self.rank == 0:
            logger.warning(
                f"step {self.step}: loss {loss:g}, gradient norm {grad_norm:g}: not finite, step skipped "
                f"({self.skipped_in_a_row} in a row, {self.skipped_steps} in all; the run stops at {limit} in a row)"
            )
        if self.skipped_in_a_row >= limit:
            raise NonFiniteTraining(
                f"{limit} steps in a row had a non-finite loss or gradient (last: loss {loss:g}, gradient norm "
                f"{grad_norm:g}) at step {self.step}: training diverged; lower train.lr or train.backbone_lr, "
                "or check the data"
            )

    def state(self) -> dict[str, Any] | None:
        """What rank 0 checkpoints; None on other ranks."""
        if self.rank != 0:
            return None
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, step=self.step,
                    epoch=self.epoch, best_score=self.best_score, config_yaml=self.plan.config_yaml,
                    grad_scaler=self.grad_scaler)


def start_worker(plan: WorkerPlan) -> Worker:
    """A fresh worker, or one restored from the run's last checkpoint (a restarted group, a re-run)."""
    cfg = plan.cfg
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        use_fast_cuda_math()
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device)  # on the device before the optimizer, so its state lands there too
    model.cuda_dtype = PRECISIONS[cfg.train.precision]
    model.backbone.checkpoint_vision(cfg.train.grad_checkpointing)
    optimizer = build_optimizer(model, cfg.train, cfg.model)
    worker = Worker(plan, context.get_world_rank(), context.get_world_size(), device, model, optimizer,
                    build_scheduler(optimizer, cfg.train, plan.total_steps))
    if device.type == "cuda" and cfg.train.precision == "fp16":
        worker.grad_scaler = torch.amp.GradScaler("cuda")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        worker.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if worker.grad_scaler is not None and "grad_scaler" in state:
            worker.grad_scaler.load_state_dict(state["grad_scaler"])
        worker.step, worker.epoch, worker.best_score = state["step"], state["epoch"], state["best_score"]
    if worker.rank == 0:
        worker.logger = MetricLogger(plan.tracking_uri, plan.run_id)
        if checkpoint is not None:
            logger.info(f"resumed from checkpoint: epoch {worker.epoch}, "
                        f"step {worker.step}/{plan.total_steps}")
            worker.logger.client.log_metric(plan.run_id, RESUMED_METRIC, worker.step, step=worker.step)
    return worker


def input_stream(worker: Worker, shards: list[ray.data.DataIterator]) -> EpochStream:
    """The worker's batches from the epoch in progress to the last, read ahead across epoch ends: epochs take
    turns over `shards`, the next starting `data.next_epoch_lead` batches before the end of the one in progress."""
    plan, cfg = worker.plan, worker.plan.cfg
    per_worker_batch = cfg.train.batch_size // worker.world
    pin = worker.device.type == "cuda"

    def one_epoch(epoch: int) -> Iterator[dict[str, Tensor]]:
        tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)  # the epoch's own: it runs in the epoch's thread
        return epoch_batches(shards[epoch % len(shards)], per_worker_batch, tokenizer, cfg.run.seed, epoch, pin,
                             plan.caption_passes, plan.steps_per_epoch // plan.caption_passes)

    return EpochStream(one_epoch, worker.epoch, cfg.train.epochs - 1, len(shards),
                       max(1, plan.steps_per_epoch - cfg.data.next_epoch_lead))


def train_epoch(worker: Worker, ddp_model: nn.Module, stream: EpochStream) -> None:
    """The rest of the epoch in progress: batches trained before a restart are skipped, not retrained."""
    plan, cfg = worker.plan, worker.plan.cfg
    done_in_epoch = worker.step - worker.epoch * plan.steps_per_epoch
    started, samples, waited = time.perf_counter(), 0, 0.0
    worker.model.train()
    for index, (wait_s, batch) in enumerate(timed(stream.epoch(worker.epoch))):
        if index >= plan.steps_per_epoch:
            break
        waited += wait_s
        if index < done_in_epoch:
            continue
        if index == done_in_epoch and worker.logger is not None:  # what the epoch's start (or a restart) cost
            worker.logger.log({"train/epoch_start_wait_s": waited}, worker.step + 1)
        inject_fault(cfg, worker.step, worker.rank, worker.world, Path(plan.fault_marker))
        loss, parts, stepped = train_step(ddp_model, worker.optimizer, worker.scheduler, batch, cfg.train.grad_clip,
                                          cfg.train.micro_batch_size, worker.grad_scaler)
        worker.step += 1
        worker.count_step(stepped, loss.item(), parts["grad_norm"])
        samples += cfg.train.batch_size

        if worker.logger is not None and (worker.step % LOG_EVERY_STEPS == 0 or worker.step in (1, plan.total_steps)):
            elapsed = time.perf_counter() - started
            rate = samples / elapsed
            eta_s = (plan.total_steps - worker.step) * cfg.train.batch_size / max(rate, 1e-9)
            worker.logger.log({"train/loss": loss.item(), "train/lr": worker.scheduler.get_last_lr()[0],
                               "train/samples_per_s": rate, "train/data_wait_s": waited / (index + 1),
                               "train/skipped_steps": worker.skipped_steps,
                               **{f"train/{k}": v for k, v in parts.items()}}, worker.step)
            if worker.step % plan.print_every == 0 or worker.step in (1, plan.total_steps):
                logger.info(
                    f"epoch {worker.epoch + 1}/{cfg.train.epochs} step {worker.step}/{plan.total_steps} "
                    f"loss {loss.item():.4f} {rate:.1f} samples/s, data wait {100 * waited / elapsed:.0f}%, "
                    f"ETA {eta_s / 60:.1f} min"
                )
        every = cfg.train.checkpoint_every_steps
        if every and worker.step % every == 0 and index + 1 < plan.steps_per_epoch:
            report({"epoch": worker.epoch, "step": worker.step, SCORE_KEY: -1.0}, worker.state())


def end_epoch(worker: Worker, val_table: Any, tokenizer: Any) -> None:
    """Rank 0 validates and logs; every rank reports, rank 0 with a checkpoint that holds the epoch done."""
    worker.epoch += 1
    metrics: dict[str, Any] = {"epoch": worker.epoch, "step": worker.step}
    if worker.logger is not None:
        val = evaluate_split(worker.model, val_table, tokenizer, worker.plan.cfg.eval.batch_size)
        worker.best_score = max(worker.best_score, val["t2v/R1"])
        worker.logger.log({f"val/{k}": v for k, v in val.items()} | {"epoch": worker.epoch}, worker.step)
        logger.info(f"epoch {worker.epoch} val " + " ".join(f"{k} {v:.1f}" for k, v in val.items()))
        metrics |= {SCORE_KEY: val["t2v/R1"], **{f"val/{k}": v for k, v in val.items()}}
    report(metrics, worker.state())


def run_worker(loop_config: dict[str, Any], shards: list[ray.data.DataIterator]) -> None:
    """What every Ray Train worker runs (`hvd.train.entry`): restore, then train and close epochs until the last."""
    faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
    quiet_logs()  # again: importing MLflow in this process reset its level
    plan = WorkerPlan.from_loop_config(loop_config)
    worker = start_worker(plan)
    # reading starts now, so Ray Data's start overlaps the model's wrapping, the monitor and the val split's read
    stream = input_stream(worker, shards)
    # DistributedDataParallel when world > 1, unless micro-batched (hvd.train.gradients averages then)
    ddp_model = ray.train.torch.prepare_model(worker.model, parallel_strategy=None if plan.cfg.train.micro_batch_size else "ddp")
    monitor = None
    val_table = tokenizer = None
    if worker.rank == 0:
        monitor = SystemMetricsMonitor(plan.run_id, tracking_uri=plan.tracking_uri, resume_logging=worker.step > 0)
        monitor.start()
        val_table = read_shards(plan.shards, plan.val_split)
        tokenizer = build_tokenizer(plan.cfg.model, plan.cfg.data.max_words)
    try:
        while worker.epoch < plan.cfg.train.epochs:
            train_epoch(worker, ddp_model, stream)
            end_epoch(worker, val_table, tokenizer)
    finally:
        stream.close()
    if monitor is not None:
        monitor.finish()
