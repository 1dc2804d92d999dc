"""FFSM, the macro-perception step of HVD: for every (caption, video) pair, keep the frames the caption is about.

Rules (`model.hvd.frame_select`): `share`, the paper's, keeps a fixed share of each video's frames, the most
caption-similar. A fixed share caps precision at the event's share / the share kept (docs/benchmarks.md, the
study's `select` grid), so two rules keep as many frames as match the caption: `above_mean`, every frame at least
as similar as the video's mean frame, and `near_best`, every frame within a cosine margin of the best one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hvd.config import CHOICES
from hvd.model.clustering import keep_count


def select_frames(sentence: Tensor, frames: Tensor, keep: float, frame_mask: Tensor, rule: str = "share",
                  margin: float = 0.0) -> Tensor:
    """[Nt, Nv, T] bool: of each video's n valid frames, the ones each caption keeps by `rule` (`keep_frames`).

    `sentence` [Nt, D] and `frames` [Nv, T, D] are unit vectors; `frame_mask` [Nv, T] is False on padding
    frames, which are never kept.
    """
    return keep_frames(torch.einsum("td,vkd->tvk", sentence, frames), frame_mask, keep, rule, margin)


def select_frames_grouped(sentence: Tensor, frames: Tensor, keep: float, frame_mask: Tensor,
                          rule: str = "share", margin: float = 0.0) -> Tensor:
    """[Q, k, T] bool: `select_frames` of each query with its own k candidates: sentence [Q, D] with frames
    [Q, k, T, D] (mask [Q, k, T]), or sentence [Q, k, D] with frames [Q, T, D] (mask [Q, T])."""
    if sentence.ndim == 2:
        return keep_frames(torch.einsum("qd,qktd->qkt", sentence, frames), frame_mask, keep, rule, margin)
    return keep_frames(torch.einsum("qkd,qtd->qkt", sentence, frames), frame_mask[:, None], keep, rule, margin)


def keep_frames(similarity: Tensor, frame_mask: Tensor, keep: float, rule: str = "share",
                margin: float = 0.0) -> Tensor:
    """[..., T] bool: the frames `rule` keeps of each row's valid frames; `frame_mask` broadcasts to it.

    `share`: the ceil(n * keep) most similar of n (`keep_best`). `above_mean`: every valid frame whose similarity
    is at least the mean over the row's valid frames. `near_best`: every valid frame within `margin` of the row's
    best. The most similar frame is always kept, so no row keeps none to rounding.
    """
    if rule == "share":
        return keep_best(similarity, frame_mask, keep)
    mask = frame_mask.expand_as(similarity)
    best = similarity.masked_fill(~mask, -math.inf).amax(dim=-1, keepdim=True)
    if rule == "above_mean":
        threshold = similarity.masked_fill(~mask, 0).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    elif rule == "near_best":
        threshold = best - margin
    else:
        raise ValueError(f"frame selection rule {rule!r}: expected one of {CHOICES['model.hvd.frame_select']}")
    return mask & ((similarity >= threshold) | (similarity == best))


def keep_best(similarity: Tensor, frame_mask: Tensor, keep: float) -> Tensor:
    """[..., T] bool: the ceil(n * keep) best of each row's n valid frames (ties to the earlier frame);
    `frame_mask` broadcasts to it."""
    similarity = similarity.masked_fill(~frame_mask, -math.inf)
    order = similarity.argsort(dim=-1, descending=True, stable=True)
    counts = keep_count(frame_mask.sum(dim=-1), keep)
    top = torch.arange(similarity.shape[-1], device=similarity.device) < counts[..., None]  # in `order`
    return torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, order, top.expand_as(order))
