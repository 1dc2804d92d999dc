"""A training step's FLOPs and the GPU peaks that MFU is taken against, for the benchmarks that report them."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak TFLOP/s of one GPU from the vendors' data sheets: bf16, fp16, and fp32 as TF32 matmuls
# (training turns TF32 on: hvd.train.step.use_fast_cuda_math).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
}


def peak_tflops(device_name: str, precision: str = "bf16", override: float | None = None) -> float | None:
    """`override`, else the table's peak for the first GPU named in `device_name`; None when unknown."""
    if override:
        return override
    return next((peaks[precision] for gpu, peaks in PEAK_TFLOPS.items() if gpu in device_name), None)


def step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Forward and backward FLOPs of one training step (`torch.utils.flop_counter`: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(batch["tokens"], batch["frames"], batch["frame_mask"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
