"""Does the input pipeline keep the training step fed? Steps/s with the real pipeline against pre-made tensors.

    python benchmarks/train_throughput.py [--config configs/demo.yaml] [--preset tiny] [--device cpu|cuda]
                                          [--steps 25] [--warmup 5] [--peak-tflops N] [key=value ...]
    python benchmarks/train_throughput.py --epochs 4 --steps 10 [--stills] [key=value ...]

One process, one run, the same model and batch shape for both:
1. pipeline: the training input path of `hvd.train.inputs` (Ray Data decodes the demo
   benchmark's train shards on CPU tasks, `iter_torch_batches` tokenises, collates and prefetches), then
   `hvd.train.step.train_step` on the device;
2. tensors: the same steps on batches made once, already on the device, measured before and after 1.
Reports steps/s and samples/s of each, the ratio tensors / pipeline (target <= 1.10), the share of pipeline
time spent waiting for data, and model FLOPs per step with the FLOP utilisation against `--peak-tflops`
(FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` on one forward + backward: matmuls and
convolutions, 2 per multiply-add; attention as its matmuls; element-wise work not counted).
Prints one JSON object.

`--epochs N` measures epoch ends instead: N epochs of `--steps` steps, each followed by the real validation of
the val split (what rank 0 does between epochs), twice in one process: `restart`, each epoch's Ray Data execution
started when the loop asks for its first batch (the loop before `EpochStream`), and `stream`, read ahead across
epoch ends by `hvd.train.inputs.EpochStream`. Reports per epoch the first step's data wait (seconds, and its share
of the first step's time, as the training log prints it) and each arm's wall time. `--stills`: on the warm
start's stills (`pretrain.*`) instead of the benchmark's video shards.
"""

from __future__ import annotations

import argparse
import json
import time

import ray
import torch
from flops import peak_tflops, step_flops  # benchmarks/flops.py

from hvd.config import Config, load_config
from hvd.data.shards import read_shards
from hvd.eval.encode import evaluate_split
from hvd.model import build_model, build_tokenizer
from hvd.train.inputs import EpochStream, epoch_batches, training_dataset
from hvd.train.loop import timed
from hvd.train.optim import build_optimizer, build_scheduler
from hvd.train.step import train_step, use_fast_cuda_math
from hvd.train.trainer import prepare_data
from hvd.train.warm_start import pretrain_config, warm_start_stills


def steps_per_second(step, batches, steps: int, warmup: int) -> tuple[float, float]:
    """(steps/s, share of the time spent waiting for the next batch) over `steps` after `warmup`."""
    waited, started = 0.0, None
    for index, (wait_s, batch) in enumerate(timed(batches)):
        if index == warmup:
            sync()
            started, waited = time.perf_counter(), 0.0
        waited += wait_s
        step(batch)
        if index + 1 == warmup + steps:
            sync()
            elapsed = time.perf_counter() - started
            return steps / elapsed, waited / elapsed
    raise RuntimeError(f"the train split gave fewer than {warmup + steps} batches; lower --steps")


def epoch_ends(cfg: Config, shards, step, validate, epochs: int, steps: int, read_ahead: bool) -> dict:
    """`epochs` epochs of `steps` steps and a validation each: the first step's data wait per epoch, the wall time."""
    iterator = training_dataset(cfg, shards).iterator()
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)

    def one_epoch(epoch: int):
        return epoch_batches(iterator, cfg.train.batch_size, tokenizer, cfg.run.seed, epoch,
                             pin_memory=torch.cuda.is_available(), steps_per_pass=steps)

    started = time.perf_counter()
    stream = EpochStream(one_epoch, 0, epochs - 1) if read_ahead else None
    first_waits, first_shares = [], []
    for epoch in range(epochs):
        for index, (wait_s, batch) in enumerate(timed(stream.epoch(epoch) if stream else one_epoch(epoch))):
            step_started = time.perf_counter()
            step(batch)
            sync()
            if index == 0:
                first_waits.append(round(wait_s, 2))
                first_shares.append(round(wait_s / (wait_s + time.perf_counter() - step_started), 3))
        validate()
    if stream is not None:
        stream.close()
    return {"first_step_wait_s": first_waits, "first_step_data_wait_share": first_shares,
            "wall_s": round(time.perf_counter() - started, 1)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    parser.add_argument("--epochs", type=int, default=0, help="measure epoch ends over this many epochs instead")
    parser.add_argument("--stills", action="store_true", help="with --epochs: the warm start's stills")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # random weights unless told otherwise: throughput does not depend on them
    cfg = load_config(args.config, [f"model.preset={args.preset}", "model.pretrained=null", *args.overrides])
    device = torch.device(args.device)
    if device.type == "cuda":
        use_fast_cuda_math()

    shards = prepare_data(cfg).shards  # joins or starts Ray, then generates and prepares what is missing
    if args.stills:  # the warm start's config and stills, written under pretrain.out unless there already
        shards = warm_start_stills(cfg)
        cfg = pretrain_config(cfg, "benchmark", shards)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.train, cfg.model)
    scheduler = build_scheduler(optimizer, cfg.train, 10 * (args.warmup + args.steps))
    batch_size = cfg.train.batch_size

    def step(batch):
        train_step(model, optimizer, scheduler, {k: v.to(device) for k, v in batch.items()}, cfg.train.grad_clip)

    if args.epochs:
        val, tokenizer = read_shards(shards, "val"), build_tokenizer(cfg.model, cfg.data.max_words)
        validate = lambda: evaluate_split(model, val, tokenizer, cfg.eval.batch_size)  # noqa: E731
        arms = {}
        for arm in ("restart", "stream", "stream", "restart"):  # ABBA: drifting load from other processes hits both
            one = epoch_ends(cfg, shards, step, validate, args.epochs, args.steps, read_ahead=arm == "stream")
            arms.setdefault(arm, []).append(one)
        print(json.dumps({"shards": str(shards), "batch_size": batch_size,
                          "epochs": args.epochs, "steps_per_epoch": args.steps, "val_rows": val.num_rows,
                          "cpus": ray.cluster_resources().get("CPU"), **arms}, indent=2))
        return

    def pipeline_batches():
        iterator = training_dataset(cfg, shards).iterator()
        tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)
        return epoch_batches(iterator, batch_size, tokenizer, cfg.run.seed, 0, pin_memory=device.type == "cuda")

    first = next(pipeline_batches())
    premade = {key: value.to(device) for key, value in first.items()}
    flops = step_flops(model, premade)
    # tensors, pipeline, tensors again: load from other processes drifts, the baseline brackets the pipeline
    before, _ = steps_per_second(step, iter(lambda: premade, None), args.steps, args.warmup)
    pipeline_rate, wait_share = steps_per_second(step, pipeline_batches(), args.steps, args.warmup)
    after, _ = steps_per_second(step, iter(lambda: premade, None), args.steps, args.warmup)
    tensor_rate = (before + after) / 2

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, "bf16", args.peak_tflops)
    result = {
        "device": name,
        "preset": cfg.model.preset,
        "head": cfg.model.head,
        "batch_size": batch_size,
        "frames": list(first["frames"].shape[1:]),
        "cpus": ray.cluster_resources().get("CPU"),
        "pipeline_steps_per_s": round(pipeline_rate, 3),
        "tensors_steps_per_s": round(tensor_rate, 3),
        "ratio_tensors_over_pipeline": round(tensor_rate / pipeline_rate, 3),
        "pipeline_data_wait_share": round(wait_share, 3),
        "samples_per_s": round(pipeline_rate * batch_size, 1),
        "gflops_per_step": round(flops / 1e9, 2),
        "achieved_tflops": round(flops * tensor_rate / 1e12, 3),
        "mfu": round(flops * tensor_rate / (peak * 1e12), 4) if peak else "unknown peak",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
