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
    return keep_best(torch.einsum("td,vkd->tvk", sentence, frames), frame_mask, keep)


def select_frames_grouped(sentence: Tensor, frames: Tensor, keep: float, frame_mask: Tensor) -> Tensor:
    """[Q, k, T] bool: `select_frames` of each query with its own k candidates: sentence [Q, D] with frames
    [Q, k, T, D] (mask [Q, k, T]), or sentence [Q, k, D] with frames [Q, T, D] (mask [Q, T])."""
    if sentence.ndim == 2:
        return keep_best(torch.einsum("qd,qktd->qkt", sentence, frames), frame_mask, keep)
    return keep_best(torch.einsum("qkd,qtd->qkt", sentence, frames), frame_mask[:, None], keep)


def keep_best(similarity: Tensor, frame_mask: Tensor, keep: float) -> Tensor:
    """[..., T] bool: the ceil(n * keep) best of each row's n valid frames; `frame_mask` broadcasts to it."""
    similarity = similarity.masked_fill(~frame_mask, -math.inf)
    order = similarity.argsort(dim=-1, descending=True, stable=True)
    counts = keep_count(frame_mask.sum(dim=-1), keep)
    top = torch.arange(similarity.shape[-1], device=similarity.device) < counts[..., None]  # in `order`
    return torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, order, top.expand_as(order))
