"""The training loop every Ray Train worker runs, readable top to bottom.

Each worker encodes its share of the global batch; the loss gathers features from all ranks (with
gradients), so every rank computes the same global-batch loss, and DistributedDataParallel's averaged
gradients equal the single-process gradient of that loss (tests/test_model_distributed.py). Frames
arrive decoded (`hvd.train.inputs`); rank 0 validates, logs to MLflow and writes checkpoints.
"""

from __future__ import annotations

import faulthandler
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import ray.train
import ray.train.torch
import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from omegaconf import OmegaConf
from torch import Tensor, nn

from hvd.checkpoint import load_state, save_state
from hvd.config import Config
from hvd.data.shards import read_shards
from hvd.eval.encode import evaluate_split
from hvd.model import build_model, build_tokenizer
from hvd.tracking import MetricLogger
from hvd.train.inputs import epoch_batches
from hvd.train.optim import build_optimizer, build_scheduler

SCORE_KEY = "val_score"  # what the best checkpoint is chosen by: val t2v R@1, -1 for mid-epoch saves
RESUMED_METRIC = "train/resumed_from_step"  # logged by rank 0 each time the worker group resumes
LOG_EVERY_STEPS = 10
T = TypeVar("T")


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: dict[str, Tensor],
    grad_clip: float,
) -> tuple[Tensor, dict[str, float]]:
    """One optimisation step on a `TrainingCollate` batch; `model` is the DDP-wrapped model when there are
    several workers."""
    loss, parts = model(batch["tokens"], batch["frames"], batch["frame_mask"])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP all-reduces gradient buckets while the rest of backward runs
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach(), parts


def timed(batches: Iterator[T]) -> Iterator[tuple[float, T]]:
    """Each item with the seconds the loop waited for it: near zero while prefetching keeps up."""
    while True:
        started = time.perf_counter()
        try:
            item = next(batches)
        except StopIteration:
            return
        yield time.perf_counter() - started, item


def use_fast_cuda_math() -> None:
    """TF32 tensor cores for the fp32 matmuls left outside bf16 autocast (the loss, the optimizer)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def inject_fault(cfg: Config, step: int, rank: int, world_size: int, marker: Path) -> None:
    """Test-only: the last worker dies once at `train.fail_at_step`, as a lost node would."""
    if cfg.train.fail_at_step == step and rank == world_size - 1 and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        print(f"[fault injection] worker {rank} exits at step {step}", flush=True)
        os._exit(1)


def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Report to Ray Train; with `state` (rank 0 only) also a checkpoint."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, **state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(loop_config["config_yaml"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    steps_per_epoch, total_steps = loop_config["steps_per_epoch"], loop_config["steps_per_epoch"] * cfg.train.epochs
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        use_fast_cuda_math()

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device)  # on the device before the optimizer, so its state lands there too
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)
    optimizer = build_optimizer(model, cfg.train, cfg.model)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    step, epoch, best_score = 0, 0, -1.0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a re-run of an unfinished run
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, epoch, best_score = state["step"], state["epoch"], state["best_score"]
    ddp_model = ray.train.torch.prepare_model(model)  # DistributedDataParallel when world > 1

    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if logger is not None and checkpoint is not None:
        print(f"resumed from checkpoint: epoch {epoch}, step {step}/{total_steps}", flush=True)
        logger.client.log_metric(loop_config["run_id"], RESUMED_METRIC, step, step=step)
    monitor = None
    if rank == 0:
        monitor = SystemMetricsMonitor(loop_config["run_id"], tracking_uri=loop_config["tracking_uri"], resume_logging=step > 0)
        monitor.start()
    val_table = read_shards(loop_config["shards"], loop_config["val_split"]) if rank == 0 else None
    per_worker_batch = cfg.train.batch_size // world
    fault_marker = Path(loop_config["fault_marker"])

    def state_for(at_epoch: int) -> dict[str, Any] | None:
        if rank != 0:
            return None
        return dict(model=model, optimizer=optimizer, scheduler=scheduler, step=step, epoch=at_epoch,
                    best_score=best_score, config_yaml=loop_config["config_yaml"])

    shard = ray.train.get_dataset_shard("train")
    while epoch < cfg.train.epochs:
        model.train()
        done_in_epoch = step - epoch * steps_per_epoch  # batches already trained before a restart
        started, samples, waited = time.perf_counter(), 0, 0.0
        batches = epoch_batches(shard, per_worker_batch, cfg.run.seed, epoch, pin_memory=device.type == "cuda")
        for index, (wait_s, batch) in enumerate(timed(batches)):
            if index >= steps_per_epoch:
                break
            waited += wait_s
            if index < done_in_epoch:
                continue
            inject_fault(cfg, step, rank, world, fault_marker)
            loss, parts = train_step(ddp_model, optimizer, scheduler, batch, cfg.train.grad_clip)
            step += 1
            samples += per_worker_batch * world

            if logger is not None and (step % LOG_EVERY_STEPS == 0 or step in (1, total_steps)):
                elapsed = time.perf_counter() - started
                rate = samples / elapsed
                eta_s = (total_steps - step) * cfg.train.batch_size / max(rate, 1e-9)
                logger.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                            "train/samples_per_s": rate, "train/data_wait_s": waited / (index + 1),
                            **{f"train/{k}": v for k, v in parts.items()}}, step)
                print(f"epoch {epoch + 1}/{cfg.train.epochs} step {step}/{total_steps} loss {loss.item():.4f} "
                      f"{rate:.1f} samples/s, data wait {100 * waited / elapsed:.0f}%, ETA {eta_s / 60:.1f} min",
                      flush=True)
            every = cfg.train.checkpoint_every_steps
            if every and step % every == 0 and index + 1 < steps_per_epoch:
                report({"epoch": epoch, "step": step, SCORE_KEY: -1.0}, state_for(epoch))

        epoch += 1
        metrics: dict[str, Any] = {"epoch": epoch, "step": step}
        if rank == 0:
            val = evaluate_split(model, val_table, tokenizer, cfg.eval.batch_size)
            best_score = max(best_score, val["t2v/R1"])
            logger.log({f"val/{k}": v for k, v in val.items()} | {"epoch": epoch}, step)
            print(f"epoch {epoch} val " + " ".join(f"{k} {v:.1f}" for k, v in val.items()), flush=True)
            metrics |= {SCORE_KEY: val["t2v/R1"], **{f"val/{k}": v for k, v in val.items()}}
        report(metrics, state_for(epoch))

    if monitor is not None:
        monitor.finish()
