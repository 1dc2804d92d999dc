"""The CUDA path, checked on the GPUs present: one ViT-B/32 training step per precision, and NCCL.

    python benchmarks/gpu_smoke.py [--batch 32] [--frames 12] [--steps 5] [--head hvd] [--peak-tflops N]
        [--compare-heads meanp,xpool,...] [--json FILE]

Random ViT-B/32 weights (nothing is downloaded) in the retrieval model with `--head`, one worker's batch of
`--frames` 224 px frames and 32-token captions. For each setting (bf16, fp16 with the gradient scaler, fp32 with
TF32 matmuls; then bf16 with `train.grad_checkpointing` and with `train.micro_batch_size` = batch / 4), one
warm-up step and `--steps` timed production steps (`hvd.train.step.train_step`, AdamW): samples/s,
`torch.cuda.max_memory_allocated`, and MFU = the step's FLOPs (`torch.utils.flop_counter`, 2 per multiply-add,
forward and backward of one plain step) per second over the GPU's dense peak for that precision (a table of
known GPUs below, or `--peak-tflops`; checkpointing and micro-batching recompute, which MFU does not count).
With `--compare-heads`, the bf16 step of each head listed, one row each, on the same batch. Then NCCL: one
process per GPU (one GPU: NCCL with a single rank), a 256 MiB all-reduce (algorithm and bus
bandwidth) and one DistributedDataParallel step on each rank's batch.

Without CUDA it prints one line saying why and exits 0, so CI runs it on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from flops import peak_tflops, step_flops  # benchmarks/flops.py

from hvd.config import ModelConfig, TrainConfig
from hvd.model import build_model
from hvd.train.optim import build_optimizer, build_scheduler
from hvd.train.step import PRECISIONS, train_step, use_fast_cuda_math

PRESET = "ViT-B-32"
SETTINGS = (  # (label, precision, grad checkpointing, micro-batches per batch)
    ("bf16", "bf16", False, 1),
    ("fp16", "fp16", False, 1),
    ("fp32", "fp32", False, 1),
    ("bf16 + grad checkpointing", "bf16", True, 1),
    ("bf16 + micro-batch / 4", "bf16", False, 4),
)


def inputs(batch: int, frames: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = {
        "tokens": torch.randint(1, 49_000, (batch, 32), generator=generator),
        "frames": torch.randint(0, 256, (batch, frames, 224, 224, 3), dtype=torch.uint8, generator=generator),
        "frame_mask": torch.ones(batch, frames, dtype=torch.bool),
    }
    return {key: value.to(device) for key, value in values.items()}


def model_on(device: torch.device, head: str, precision: str, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=PRESET, head=head)).to(device)
    model.cuda_dtype = PRECISIONS[precision]
    model.backbone.checkpoint_vision(checkpointing)
    return model


def time_setting(args: argparse.Namespace, device: torch.device, label: str, precision: str, checkpointing: bool,
                 micro_parts: int, flops: int, head: str) -> dict[str, Any]:
    model = model_on(device, head, precision, checkpointing)
    train = TrainConfig(precision=precision)
    optimizer = build_optimizer(model, train, ModelConfig(preset=PRESET, head=head))
    scheduler = build_scheduler(optimizer, train, args.steps + 1)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    micro = args.batch // micro_parts if micro_parts > 1 else 0
    batch = inputs(args.batch, args.frames, device)
    train_step(model, optimizer, scheduler, batch, 1.0, micro, scaler)  # warm-up: kernels chosen, memory pooled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    sound = [train_step(model, optimizer, scheduler, batch, 1.0, micro, scaler)[2] for _ in range(args.steps)]
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - started) / args.steps
    peak = peak_tflops(torch.cuda.get_device_name(device), precision, args.peak_tflops)
    return {
        "setting": label, "precision": precision, "grad_checkpointing": checkpointing, "micro_batch": micro,
        "step_s": round(step_s, 4), "samples_per_s": round(args.batch / step_s, 1),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "achieved_TFLOPs": round(flops / step_s / 1e12, 1),
        "MFU": round(flops / step_s / (peak * 1e12), 3) if peak else None,
        "sound_steps": sum(sound),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One rank: a timed 256 MiB all-reduce, then one DDP production step on this rank's batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    try:
        use_fast_cuda_math()
        tensor = torch.ones(64 * 2**20, device=device)  # 256 MiB of fp32
        for _ in range(2):
            dist.all_reduce(tensor)
        torch.cuda.synchronize()
        repeats = 10
        started = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(tensor)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / repeats
        model = model_on(device, args.head, "bf16", False)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        optimizer = build_optimizer(model, TrainConfig(), ModelConfig(preset=PRESET, head=args.head))
        scheduler = build_scheduler(optimizer, TrainConfig(), 4)
        batch = inputs(args.batch, args.frames, device, seed=rank)
        started = time.perf_counter()
        loss, _, sound = train_step(ddp, optimizer, scheduler, batch, 1.0)
        torch.cuda.synchronize()
        step_s = time.perf_counter() - started
        if rank == 0:
            size = tensor.numel() * tensor.element_size()
            Path(out).write_text(json.dumps({
                "world": world, "all_reduce_MiB": size // 2**20, "all_reduce_ms": round(seconds * 1e3, 2),
                "algorithm_GBps": round(size / seconds / 1e9, 1),
                "bus_GBps": round(size / seconds / 1e9 * 2 * (world - 1) / world, 1) if world > 1 else None,
                "ddp_step_s": round(step_s, 3), "ddp_loss": round(loss.item(), 4), "ddp_step_sound": sound,
            }))
    finally:
        dist.destroy_process_group()


def print_table(first: str, rows: list[dict[str, Any]]) -> None:
    print(f"| {first} | samples/s | step s | peak memory GiB | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for r in rows:
        mfu = "" if r["MFU"] is None else f"{100 * r['MFU']:.1f}%"
        print(f"| {r['setting']} | {r['samples_per_s']} | {r['step_s']} | {r['peak_memory_GiB']} "
              f"| {r['achieved_TFLOPs']} | {mfu} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="one worker's batch")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting, after one warm-up")
    parser.add_argument("--head", default="hvd")
    parser.add_argument("--compare-heads", default="", metavar="H1,H2,...",
                        help="also time the bf16 step of each of these heads on the same batch")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak, if not in the table")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_smoke: skipped, no CUDA device (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'}): nothing to measure on this machine")
        return
    device = torch.device("cuda", 0)
    use_fast_cuda_math()
    name = torch.cuda.get_device_name(device)
    flops = step_flops(model_on(device, args.head, "bf16", False), inputs(args.batch, args.frames, device))
    rows = []
    for label, precision, checkpointing, micro_parts in SETTINGS:
        rows.append(time_setting(args, device, label, precision, checkpointing, micro_parts, flops, args.head))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    heads = []
    for head in filter(None, args.compare_heads.split(",")):
        head_flops = step_flops(model_on(device, head, "bf16", False), inputs(args.batch, args.frames, device))
        heads.append(time_setting(args, device, head, "bf16", False, 1, head_flops, head))
        print(json.dumps(heads[-1]), flush=True)
        torch.cuda.empty_cache()
    world = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nccl.json"
        mp.spawn(nccl_rank, args=(world, free_port(), args, str(out)), nprocs=world)
        nccl = json.loads(out.read_text())
    print(json.dumps(nccl))
    print(f"\n{name}, {PRESET} + {args.head}, batch {args.batch} x {args.frames} frames, "
          f"{flops / 1e12:.2f} TFLOPs per step, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print_table("setting", rows)
    if heads:
        print()
        print_table("head (bf16)", heads)
    print(f"NCCL, {nccl['world']} rank(s): all-reduce {nccl['all_reduce_MiB']} MiB in {nccl['all_reduce_ms']} ms "
          f"({nccl['algorithm_GBps']} GB/s), one DDP step {nccl['ddp_step_s']} s, loss {nccl['ddp_loss']}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "flops_per_step": flops, "settings": rows,
                                         "heads": heads, "nccl": nccl, "args": vars(args) | {"json": str(args.json)}}, indent=2) + "\n")
    sys.exit(0 if all(r["sound_steps"] == args.steps for r in rows + heads) and nccl["ddp_step_sound"] else 1)


if __name__ == "__main__":
    main()
