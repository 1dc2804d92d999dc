"""DPC-KNN token clustering (density peaks, k-nearest-neighbour density) and learned cluster merging.

Batched over [B, N, C] with a padding mask and no Python loop over the batch. Ties (duplicated
tokens, equal scores) are broken by a fixed priority per token position drawn from a seeded
generator, so one input always gives one clustering, in training and at evaluation alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DUPLICATE_TOLERANCE = 1e-5  # float32 cancellation in |x|^2 + |y|^2 - 2xy is a few 1e-7 of |x|^2 + |y|^2


@dataclass
class Clusters:
    assignment: Tensor  # [B, N] cluster of every token, -1 on padding
    centres: Tensor  # [B, M] token index of every cluster's centre (0 for empty clusters)
    mask: Tensor  # [B, M] bool, False for clusters beyond an item's count


def keep_count(n: int | Tensor, share: float) -> int | Tensor:
    """ceil(n * share), at least 1; the 1e-6 absorbs float error such as 10 * 0.3 = 3.0000000000000004."""
    if isinstance(n, Tensor):
        return torch.ceil(n.double() * share - 1e-6).long().clamp(min=1)
    return max(1, math.ceil(n * share - 1e-6))


def tie_break_priority(n: int, seed: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """A fixed priority per token position; of two tied tokens the one with the higher priority wins."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator).to(device)


def pairwise_distances(x: Tensor) -> Tensor:
    """[B, N, N] Euclidean distances over sqrt(C) from one Gram matrix (`|x|^2 + |y|^2 - 2xy`), as HBI and
    HVP-Net compute them, instead of C-wide element-wise differences.

    Exactly symmetric (`xy + yx` is the same float sum both ways round) and exactly zero on the diagonal
    and between equal tokens: a squared distance within float error of zero (DUPLICATE_TOLERANCE of the
    two squared norms) is zero, so duplicated tokens tie and the tie-break priority decides, as with
    exact distances. Seven passes over [B, N, N], in place where possible: at N of a few hundred and
    narrow channels these passes, not the matrix product, are the cost.
    """
    x = x / math.sqrt(x.shape[-1])
    gram = x @ x.transpose(1, 2)
    norms = gram.diagonal(dim1=1, dim2=2).contiguous()  # a strided diagonal broadcasts 4x slower
    scale = norms[:, :, None] + norms[:, None, :]
    squared = gram.transpose(1, 2).contiguous().add_(gram)  # a blocked transpose copy beats a strided add
    torch.sub(scale, squared, out=squared)
    duplicate = squared <= scale.mul_(DUPLICATE_TOLERANCE)
    return squared.masked_fill_(duplicate, 0.0).sqrt_()


def _rank(value: Tensor, priority: Tensor) -> Tensor:
    """[B, N] place of every token when sorted by `value`, highest first, ties by priority (0 = first).

    Padding holds -inf and sorts last. A sort (N log N) instead of N x N pairwise comparisons.
    """
    by_priority = priority.argsort(descending=True)
    order = by_priority[value[:, by_priority].argsort(dim=1, descending=True, stable=True)]
    places = torch.arange(value.shape[1], device=value.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


def _knn_density(dist: Tensor, valid: Tensor, k: int, padded: bool) -> Tensor:
    """exp(-mean squared distance to the k nearest valid tokens, the token itself included)."""
    candidates = dist.masked_fill(~valid[:, None, :], math.inf) if padded else dist
    nearest = candidates.topk(min(k, dist.shape[-1]), dim=-1, largest=False)
    k_valid = valid.sum(dim=1).clamp(max=k)  # fewer than k tokens: all of them
    used = torch.arange(nearest.values.shape[-1], device=dist.device) < k_valid[:, None, None]
    squared = torch.where(used, nearest.values.square(), 0.0).sum(dim=-1)
    return torch.exp(-squared / k_valid[:, None])


@torch.no_grad()
def dpc_knn(x: Tensor, ratio: float, k: int, mask: Tensor | None = None, seed: int = 0) -> Clusters:
    """Cluster every item's tokens into ceil(n_valid * ratio) clusters around its density peaks.

    Distances are Euclidean over sqrt(C); a token's density comes from its k nearest neighbours; its
    delta is the distance to the nearest denser token (for the densest, the largest distance in the
    item); the tokens with the largest density * delta are the centres, ranked by that product; every
    other token joins its nearest centre, the best-ranked one on a tie.
    """
    if x.ndim != 3:
        raise ValueError(f"dpc_knn expects tokens [batch, tokens, channels], got {list(x.shape)}")
    batch, n, channels = x.shape
    x = x.float()
    if mask is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=x.device)
    else:
        valid = mask.bool()
        if bool((valid.sum(dim=1) == 0).any()):
            raise ValueError("dpc_knn: every item needs at least one token that is not padding")
    counts = keep_count(valid.sum(dim=1), ratio)
    priority = tie_break_priority(n, seed, x.device)

    dist = pairwise_distances(x)
    padded = mask is not None  # without padding, the N x N masking below is skipped
    density = _knn_density(dist, valid, k, padded).masked_fill(~valid, -math.inf)
    density_rank = _rank(density, priority)
    denser = density_rank[:, None, :] < density_rank[:, :, None]  # (b, i, j): token j is denser than i
    if padded:
        dist = dist.masked_fill(~(valid[:, :, None] & valid[:, None, :]), 0.0)
    largest = dist.amax(dim=(1, 2))
    delta = torch.where(denser, dist, math.inf).amin(dim=-1)  # padding ranks last: never denser
    delta = torch.where(torch.isinf(delta), largest[:, None], delta)

    score = (density * delta).masked_fill(~valid, -math.inf)
    rank = _rank(score, priority)  # 0 = best centre candidate
    is_centre = valid & (rank < counts[:, None])

    clusters = int(counts.max())
    positions = torch.arange(n, device=x.device).expand(batch, n)
    slot = torch.where(is_centre, rank, clusters)  # non-centres land in a spare column, dropped below
    centres = torch.zeros(batch, clusters + 1, dtype=torch.long, device=x.device)
    centres = centres.scatter(1, slot, positions)[:, :clusters]
    cluster_mask = torch.arange(clusters, device=x.device) < counts[:, None]

    to_centre = dist.gather(2, centres[:, None, :].expand(batch, n, clusters))
    assignment = to_centre.masked_fill(~cluster_mask[:, None, :], math.inf).argmin(
        dim=-1
    )  # first = best rank
    assignment = torch.where(is_centre, rank, assignment).masked_fill(~valid, -1)
    return Clusters(assignment=assignment, centres=centres, mask=cluster_mask)


def merge_clusters(x: Tensor, clusters: Clusters, scores: Tensor) -> Tensor:
    """Weighted mean of every cluster's tokens with weights exp(score): [B, M, C], zeros for empty clusters.

    The clustering carries no gradient; the merge does, to the tokens and to the learned scores.
    """
    batch, n, channels = x.shape
    x, scores = x.float(), scores.float()
    valid = clusters.assignment >= 0
    index = clusters.assignment.clamp(min=0)
    scores = scores.masked_fill(~valid, -math.inf)
    # Subtracting each cluster's top score keeps exp() finite and leaves the weighted mean unchanged.
    top = torch.full(clusters.mask.shape, -math.inf, device=x.device).scatter_reduce(
        1, index, scores.detach(), reduce="amax"
    )
    weight = torch.exp(scores - top.gather(1, index))
    total = torch.zeros(clusters.mask.shape, device=x.device).scatter_add(1, index, weight)
    summed = torch.zeros(batch, clusters.mask.shape[1], channels, device=x.device).scatter_add(
        1, index[..., None].expand(batch, n, channels), weight[..., None] * x
    )
    return summed / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
