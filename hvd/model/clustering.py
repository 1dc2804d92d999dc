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


def squared_distances(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """[B, N, N] squared Euclidean distances over C from one Gram matrix (`|x|^2 + |y|^2 - 2xy`), as HBI and
    HVP-Net compute them, instead of C-wide element-wise differences.

    A squared distance within float error of zero (DUPLICATE_TOLERANCE of twice the item's largest squared
    norm; padding, False in `valid`, does not count) is exactly zero, so duplicated tokens tie and the
    tie-break priority decides, as with exact distances; identical tokens get identical rows. Every pass
    over [B, N, N] is an in-place broadcast or scalar operation: at N of a few hundred these passes, not
    the product, are the cost, and a boolean mask costs ten times the scalar threshold used here (hence
    the per-item unit). No [B, N, C] temporary: at C = 512 one costs more than the product.
    """
    norms = torch.linalg.vector_norm(x, dim=-1).square()
    largest = (norms if valid is None else norms.masked_fill(~valid, 0.0)).amax(dim=1)
    unit = largest.mul_(2 * DUPLICATE_TOLERANCE).clamp_(min=torch.finfo(x.dtype).tiny)[:, None, None]
    in_units = norms[:, None, :] / unit
    squared = torch.bmm(x, x.transpose(1, 2)).mul_(-2 / unit)
    squared.add_(in_units.transpose(1, 2)).add_(in_units)
    return torch.threshold_(squared, 1.0, 0.0).mul_(unit / x.shape[-1])


def _rank(value: Tensor, priority: Tensor) -> Tensor:
    """[B, N] place of every token when sorted by `value`, highest first, ties by priority (0 = first).

    Padding holds -inf and sorts last. A sort (N log N) instead of N x N pairwise comparisons.
    """
    by_priority = priority.argsort(descending=True)
    order = by_priority[value[:, by_priority].argsort(dim=1, descending=True, stable=True)]
    places = torch.arange(value.shape[1], device=value.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


def _knn_density(squared: Tensor, valid: Tensor, k: int) -> Tensor:
    """exp(-mean squared distance to the k nearest valid tokens, the token itself included)."""
    nearest = squared.topk(min(k, squared.shape[-1]), dim=-1, largest=False).values
    k_valid = valid.sum(dim=1).clamp(max=k)  # fewer than k tokens: all of them
    used = torch.arange(nearest.shape[-1], device=squared.device) < k_valid[:, None, None]
    return torch.exp(-torch.where(used, nearest, 0.0).sum(dim=-1) / k_valid[:, None])


def _penalty(valid: Tensor, value: float) -> Tensor:
    """0 for valid tokens and `value` for padding: added along a row or column, it masks in one broadcast
    add, where a boolean mask over [B, N, N] costs several times more."""
    return torch.where(valid, 0.0, value)


@torch.no_grad()
def dpc_knn(x: Tensor, ratio: float, k: int, mask: Tensor | None = None, seed: int = 0) -> Clusters:
    """Cluster every item's tokens into ceil(n_valid * ratio) clusters around its density peaks.

    Distances are Euclidean over sqrt(C); a token's density comes from its k nearest neighbours; its
    delta is the distance to the nearest denser token (for the densest, the largest distance in the
    item); the tokens with the largest density * delta are the centres, ranked by that product; every
    other token joins its nearest centre, the best-ranked one on a tie. All of it runs on squared
    distances, so the only square roots are of the [B, N] deltas.
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
    padded = mask is not None  # without padding, the N x N masking below is skipped

    squared = squared_distances(x, valid if padded else None)
    if padded:
        density = _knn_density(squared + _penalty(valid, math.inf)[:, None, :], valid, k)
        excluded = _penalty(valid, -math.inf)
        largest = (squared + excluded[:, None, :]).add_(excluded[:, :, None]).amax(dim=(1, 2))
    else:
        density = _knn_density(squared, valid, k)
        largest = squared.amax(dim=(1, 2))
    density_rank = _rank(density.masked_fill(~valid, -math.inf), priority).float()

    # delta: the nearest token of a better density rank. Every other token is pushed beyond the largest
    # distance by a penalty that is exactly 0 for the better-ranked ones (padding ranks last: never denser).
    beyond = (4 * largest + 1)[:, None]
    penalty = torch.sub(((density_rank + 0.5) * beyond)[:, None, :], (density_rank * beyond)[:, :, None])
    nearest_denser = penalty.clamp_(min=0).add_(squared).amin(dim=-1)
    delta = torch.where(nearest_denser > largest[:, None], largest[:, None], nearest_denser).sqrt()

    score = (density * delta).masked_fill(~valid, -math.inf)
    rank = _rank(score, priority)  # 0 = best centre candidate
    is_centre = valid & (rank < counts[:, None])

    clusters = int(counts.max())
    positions = torch.arange(n, device=x.device).expand(batch, n)
    slot = torch.where(is_centre, rank, clusters)  # non-centres land in a spare column, dropped below
    centres = torch.zeros(batch, clusters + 1, dtype=torch.long, device=x.device)
    centres = centres.scatter(1, slot, positions)[:, :clusters]
    cluster_mask = torch.arange(clusters, device=x.device) < counts[:, None]

    to_centre = squared.gather(2, centres[:, None, :].expand(batch, n, clusters))
    if padded:  # items with fewer clusters than the most: their spare columns never win
        to_centre.add_(_penalty(cluster_mask, math.inf)[:, None, :])
    assignment = to_centre.argmin(dim=-1)  # first = best rank
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
