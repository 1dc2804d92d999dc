"""A real recipe's shapes, before anyone rents a GPU: does it load, fit and how long would an epoch take?

    python benchmarks/recipe_dryrun.py --config configs/vit_b32_msrvtt.yaml [--config ...] [--steps 2]
        [--train-videos 9000] [--captions-per-video 20] [--gpus 4] [--gpu-tflops 312] [--utilisation 0.4]
        [key=value ...]

1. Random CLIP weights of the recipe's preset are saved in OpenAI's key layout (`visual.conv1.weight`,
   `transformer.resblocks.0.attn.in_proj_weight`, ...) and loaded through `model.pretrained`, the path the
   real weights file takes.
2. `--steps` training steps (forward, backward, AdamW) at the recipe's shapes: one worker's batch
   (`train.batch_size / train.num_workers`) of `data.num_frames` frames at the preset's image size with
   captions of `data.max_words` tokens, on this machine's CPU (or `--device cuda`).
3. Reports the FLOPs of one step (`torch.utils.flop_counter`: matmuls and convolutions, 2 per multiply-add),
   peak memory of the steps and per sample (CPU: growth of the process's peak resident memory from before the
   first step; CUDA: `max_memory_allocated`; gradients and AdamW state included, so per sample is an upper
   bound), and the projected GPU time of one epoch: FLOPs per sample x samples per
   epoch (`--train-videos`, times `--captions-per-video` with `data.expand_captions`) / (`--gpus` x
   `--gpu-tflops` x `--utilisation`).
Heads whose score grows with the batch squared (every head scores every caption against every video of the
global batch) are measured at one worker's batch: the global batch's pairwise part is larger on a cluster.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import open_clip
import torch
from flops import step_flops  # benchmarks/flops.py

from hvd.config import load_config
from hvd.model import build_model, check_inputs
from hvd.model.presets import preset_config
from hvd.train.optim import build_optimizer, build_scheduler
from hvd.train.step import train_step


def openai_layout_weights(preset: str, quick_gelu: bool, folder: Path) -> Path:
    """Random CLIP weights of `preset` as a state dict with OpenAI's key names (open_clip's CLIP keeps them)."""
    torch.manual_seed(0)
    path = folder / f"{preset}-random.pt"
    torch.save(open_clip.CLIP(**preset_config(preset, quick_gelu)).state_dict(), path)
    return path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--train-videos", type=int, default=9000, help="MSR-VTT 9k's train split")
    parser.add_argument("--captions-per-video", type=int, default=20, help="MSR-VTT's; used with data.expand_captions")
    parser.add_argument("--gpus", type=int, default=None, help="default: the recipe's train.num_workers")
    parser.add_argument("--gpu-tflops", type=float, default=312.0, help="dense bf16 peak of one GPU (A100: 312)")
    parser.add_argument("--utilisation", type=float, default=0.4, help="share of the peak a step reaches")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg.model, cfg.data)  # what the recipe asks of the model, as training checks it first
    device = torch.device(args.device)
    batch = cfg.train.batch_size // cfg.train.num_workers
    size = int(preset_config(cfg.model.preset, cfg.model.quick_gelu)["vision_cfg"]["image_size"])

    with tempfile.TemporaryDirectory() as tmp:
        weights = openai_layout_weights(cfg.model.preset, cfg.model.quick_gelu, Path(tmp))
        started = time.perf_counter()
        model = build_model(replace(cfg.model, pretrained=str(weights))).to(device)
        load_s = time.perf_counter() - started
    optimizer = build_optimizer(model, cfg.train, cfg.model)
    scheduler = build_scheduler(optimizer, cfg.train, 10 * args.steps)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "tokens": torch.randint(1, 49_000, (batch, cfg.data.max_words), generator=generator),
        "frames": torch.randint(0, 256, (batch, cfg.data.num_frames, size, size, 3), dtype=torch.uint8,
                                generator=generator),
        "frame_mask": torch.ones(batch, cfg.data.num_frames, dtype=torch.bool),
    }
    inputs = {key: value.to(device) for key, value in inputs.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_bytes()

    flops = step_flops(model, inputs)

    step_s = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss, _, finite = train_step(model, optimizer, scheduler, inputs, cfg.train.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - started)
        if not finite:
            raise SystemExit(f"a step of random weights gave a non-finite loss ({loss.item()})")
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes() - rss_before

    samples = args.train_videos * (args.captions_per_video if cfg.data.expand_captions else 1)
    gpus = args.gpus or cfg.train.num_workers
    epoch_s = flops / batch * samples / (gpus * args.gpu_tflops * 1e12 * args.utilisation)
    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "head": cfg.model.head, "preset": cfg.model.preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "worker_batch": batch, "frames": [cfg.data.num_frames, size, size], "words": cfg.data.max_words,
        "weights_load_s": round(load_s, 2), "step_s": [round(s, 2) for s in step_s],
        "gflops_per_step": round(flops / 1e9, 1), "gflops_per_sample": round(flops / batch / 1e9, 2),
        "peak_memory_mb": round(peak / 2**20), "peak_memory_mb_per_sample": round(peak / batch / 2**20, 1),
        "memory_measure": ("cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS growth from "
                           "before the first step") + "; per sample: gradients and AdamW state included, an upper bound",
        "epoch_samples": samples,
        "projected_epoch_gpu_minutes": round(epoch_s / 60, 1),
        "projection": f"{gpus} GPUs x {args.gpu_tflops} TFLOPS x {args.utilisation} utilisation",
    }, indent=2))


if __name__ == "__main__":
    main()
