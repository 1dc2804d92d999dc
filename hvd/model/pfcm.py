"""PFCM, the micro-perception step of HVD: patch tokens compressed into a few salient entities.

Each round clusters the tokens with DPC-KNN, merges every cluster by a learned weighted mean, then
lets the merged tokens (queries) attend to the tokens they came from (keys and values), with each
key's learned score as attention bias, and adds the result back to the merged tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvd.model.clustering import dpc_knn, merge_clusters


class CompressionRound(nn.Module):
    def __init__(self, dim: int, heads: int, ratio: float, k: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"PFCM width {dim} is not divisible by {heads} attention heads")
        self.heads, self.ratio, self.k = heads, ratio, k
        self.score = nn.Linear(dim, 1, bias=False)  # a bias would shift every score alike: no effect
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """[B, N, C] tokens (mask: [B, N], False on padding) -> [B, ceil(N * ratio), C] tokens and mask."""
        scores = self.score(x).squeeze(-1).float()
        clusters = dpc_knn(x.detach(), self.ratio, self.k, mask)
        merged = merge_clusters(x, clusters, scores).to(x.dtype)

        query = self._split_heads(self.query(self.norm_query(merged)))
        key, value = map(self._split_heads, self.key_value(self.norm_context(x)).chunk(2, dim=-1))
        bias = scores if mask is None else scores.masked_fill(~mask, -math.inf)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias[:, None, None, :].to(query.dtype)
        )
        out = merged + self.out(attended.transpose(1, 2).flatten(2))
        return out, None if mask is None else clusters.mask


class PFCM(nn.Module):
    def __init__(self, dim: int, steps: int, ratio: float, k: int):
        super().__init__()
        heads = max(1, dim // 64)
        self.rounds = nn.ModuleList(CompressionRound(dim, heads, ratio, k) for _ in range(steps))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        for step in self.rounds:
            x, mask = step(x, mask)
        return x, mask

    @torch.no_grad()
    def entity_assignment(self, x: Tensor) -> Tensor:
        """[B, N, C] tokens -> [B, N]: the output token (entity) each input token ends up merged into.

        For pictures of the clusters (evaluation reports): each round's DPC-KNN clustering is the one
        `forward` computes, since the clustering is deterministic for a given input.
        """
        assignment = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        for step in self.rounds:
            assignment = dpc_knn(x.detach(), step.ratio, step.k).assignment.gather(1, assignment)
            x, _ = step(x)
        return assignment
