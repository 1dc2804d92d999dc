"""FFSM, the macro-perception step of HVD: for every (caption, video) pair, keep the frames the caption is about."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hvd.model.clustering import keep_count


def select_frames(sentence: Tensor, frames: Tensor, keep: float, frame_mask: Tensor) -> Tensor:
    """[Nt, Nv, T] bool: of each video's n valid frames, the ceil(n * keep) most cosine-similar to each caption.

    `sentence` [Nt, D] and `frames` [Nv, T, D] are unit vectors; `frame_mask` [Nv, T] is False on padding
    frames, which are never kept. Ties go to the earlier frame.
    """
    similarity = torch.einsum("td,vkd->tvk", sentence, frames).masked_fill(~frame_mask, -math.inf)
    order = similarity.argsort(dim=-1, descending=True, stable=True)
    counts = keep_count(frame_mask.sum(dim=-1), keep)  # [Nv]
    top = torch.arange(frames.shape[1], device=frames.device) < counts[:, None]  # [Nv, T] in `order`
    return torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, order, top.expand_as(order))
