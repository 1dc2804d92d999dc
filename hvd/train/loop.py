"""The training loop every Ray Train worker runs, readable top to bottom.

Each worker encodes its share of the global batch; the loss gathers features from all ranks (with
gradients), so every rank computes the same global-batch loss, and averaged gradients equal the
single-process gradient of that loss. Rank 0 validates, logs to MLflow and writes checkpoints.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from omegaconf import OmegaConf

from hvd.config import Config
from hvd.data.shards import read_shards
from hvd.eval.encode import evaluate_split
from hvd.model import build_model, build_tokenizer
from hvd.tracking import MetricLogger
from hvd.train.batches import training_batch
from hvd.train.checkpoint import load_state, save_state
from hvd.train.optim import build_optimizer, build_scheduler

SCORE_KEY = "val_score"  # what the best checkpoint is chosen by: val t2v R@1, -1 for mid-epoch saves
LOG_EVERY_STEPS = 10


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """All-reduce every gradient in one flat buffer and divide by the number of workers."""
    if world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


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
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(loop_config["config_yaml"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    steps_per_epoch, total_steps = loop_config["steps_per_epoch"], loop_config["steps_per_epoch"] * cfg.train.epochs
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg.model).to(device)
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

    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if logger is not None and checkpoint is not None:
        print(f"resumed from checkpoint: epoch {epoch}, step {step}/{total_steps}", flush=True)
        logger.client.log_metric(loop_config["run_id"], "train/resumed_from_step", step, step=step)
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
        started, samples = time.perf_counter(), 0
        batches = shard.iter_batches(
            batch_size=per_worker_batch,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=4 * per_worker_batch,
            local_shuffle_seed=cfg.run.seed + epoch,
        )
        for index, batch in enumerate(batches):
            if index >= steps_per_epoch:
                break
            if index < done_in_epoch:
                continue
            inject_fault(cfg, step, rank, world, fault_marker)
            generator = torch.Generator().manual_seed(hash((cfg.run.seed, epoch, index, rank)) % 2**63)
            tokens, frames = training_batch(batch, tokenizer, generator)
            loss, parts = model.loss(model.encode_text(tokens), model.encode_video(frames.to(device)))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model, world)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            samples += per_worker_batch * world

            if logger is not None and (step % LOG_EVERY_STEPS == 0 or step in (1, total_steps)):
                rate = samples / (time.perf_counter() - started)
                eta_s = (total_steps - step) * cfg.train.batch_size / max(rate, 1e-9)
                logger.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                            "train/samples_per_s": rate, **{f"train/{k}": v for k, v in parts.items()}}, step)
                print(f"epoch {epoch + 1}/{cfg.train.epochs} step {step}/{total_steps} loss {loss.item():.4f} "
                      f"{rate:.1f} samples/s ETA {eta_s / 60:.1f} min", flush=True)
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
