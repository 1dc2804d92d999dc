"""Contrastive loss over a global batch, whichever number of data-parallel ranks holds it.

Every rank gathers the features of all ranks, with gradients, and computes the loss of the whole
global batch; the gather's backward sums the ranks' gradients into each rank's own features. Under
DDP (which averages gradients over ranks) the update is then that of one process on the global batch.

The gather uses blocking collectives (`dist.all_gather`, `dist.all_reduce`) whose buffers Python holds
for the whole call. torch's asynchronous functional collectives did the same job and corrupted the heap
of a gloo training worker now and then: glibc's "malloc_consolidate(): unaligned fastbin chunk", then
SIGSEGV in `__libc_malloc`, inside `wait_tensor` on a gathered feature (docs/benchmarks.md, "Training
engine").
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from hvd.model.features import FeaturesT, pad_to


def symmetric_infonce(logits: Tensor) -> Tensor:
    """Mean of caption-to-video and video-to-caption cross-entropy; pair i of the batch is the positive."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class _AllGather(torch.autograd.Function):
    """Every rank's tensor concatenated along dim 0; backward: this rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        if tensor.numel() == 0:  # gloo cannot move zero bytes; every rank holds the same empty shape
            return torch.cat([tensor] * world)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if grad.numel():
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather(tensor: Tensor) -> Tensor:
    if tensor.dtype == torch.bool:  # not every backend moves bools
        return _gather(tensor.to(torch.uint8)).bool()
    return _AllGather.apply(tensor)


def gather_across_ranks(features: FeaturesT) -> FeaturesT:
    """Features of every rank's batch, concatenated in rank order; the input itself without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    sizes = _gather(torch.tensor([len(features)], device=features.device))
    if bool((sizes != len(features)).any()):
        raise ValueError(
            f"every rank needs the same local batch size for the gathered loss, got {sizes.tolist()} "
            "(drop the last incomplete batch)"
        )
    return _pad_to_longest(features).map(_gather)


def _pad_to_longest(features: FeaturesT) -> FeaturesT:
    """Every [B, L, ...] field padded along L to the longest across ranks (zeros, False in masks): each rank
    trims its captions to its own longest (`hvd.train.inputs`), and all_gather needs equal shapes."""
    fields = [f.name for f in dataclasses.fields(features) if getattr(features, f.name).ndim >= 2]
    local = torch.tensor([getattr(features, name).shape[1] for name in fields], device=features.device)
    longest = local.clone()
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    if torch.equal(local, longest):
        return features
    padded = {name: pad_to(getattr(features, name), length) for name, length in zip(fields, longest.tolist(), strict=True)}
    return dataclasses.replace(features, **padded)
