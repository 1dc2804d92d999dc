"""Contrastive loss over a global batch, whichever number of data-parallel ranks holds it.

Every rank gathers the features of all ranks, with gradients, and computes the loss of the whole
global batch; the gather's backward sums the ranks' gradients into each rank's own features. Under
DDP (which averages gradients over ranks) the update is then that of one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed._functional_collectives import all_gather_single

from hvd.model.features import FeaturesT


def symmetric_infonce(logits: Tensor) -> Tensor:
    """Mean of caption-to-video and video-to-caption cross-entropy; pair i of the batch is the positive."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _gather(tensor: Tensor) -> Tensor:
    if tensor.dtype == torch.bool:  # not every backend moves bools
        return _gather(tensor.to(torch.uint8)).bool()
    return all_gather_single(tensor.contiguous(), 0, dist.group.WORLD)


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
    return features.map(_gather)
