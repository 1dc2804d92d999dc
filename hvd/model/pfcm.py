"""PFCM, the micro-perception step of HVD: patch tokens compressed into a few salient entities.

Each round is HBI's and HVP-Net's clustering block: a token convolution (kernel 3 along the token
sequence) and a LayerNorm, then a learned score per token; DPC-KNN clusters the tokens, every cluster
is merged by the exp(score)-weighted mean, and the merged tokens (queries) attend to the tokens they
came from (keys and values), with each key's score as attention bias, the result added back.

One departure, for warm starts: the convolution starts as the identity (its centre tap), so at step 0
the entities are clusters of the pretrained CLIP patch features rather than of a random mixture of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvd.model.clustering import Clusters, dpc_knn, keep_count, merge_clusters


class CompressionRound(nn.Module):
    def __init__(self, dim: int, heads: int, ratio: float, k: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"PFCM width {dim} is not divisible by {heads} attention heads")
        self.heads, self.ratio, self.k = heads, ratio, k
        self.token_conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1, bias=False)
        nn.init.dirac_(self.token_conv.weight)
        self.norm_tokens = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1, bias=False)  # a bias would shift every score alike: no effect
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None, Clusters]:
        """[B, N, C] tokens (mask: [B, N], False on padding) -> [B, ceil(N * ratio), C] tokens, their mask,
        and the clustering that made them."""
        if mask is not None:  # padding reaches no real token through the convolution
            x = x.masked_fill(~mask[..., None], 0.0)
        x = self.norm_tokens(self.token_conv(x.transpose(1, 2)).transpose(1, 2))
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
        return out, None if mask is None else clusters.mask, clusters


class PFCM(nn.Module):
    def __init__(self, dim: int, steps: int, ratio: float, k: int):
        super().__init__()
        heads = max(1, dim // 64)
        self.rounds = nn.ModuleList(CompressionRound(dim, heads, ratio, k) for _ in range(steps))

    def entity_count(self, tokens: int) -> int:
        """The entities `tokens` valid tokens compress into: the most any item of a [B, tokens] batch gets."""
        for step in self.rounds:
            tokens = keep_count(tokens, step.ratio)
        return tokens

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """[B, N, C] tokens (mask [B, N]) -> [B, M, C] entities, their mask, and [B, N] the entity each
        input token ended up merged into (-1 on padding), for entity-frame bookkeeping and pictures."""
        batch, n = x.shape[:2]
        assignment = torch.arange(n, device=x.device).expand(batch, n)
        if mask is not None:
            assignment = assignment.masked_fill(~mask, -1)
        for step in self.rounds:
            x, mask, clusters = step(x, mask)
            merged_into = clusters.assignment.gather(1, assignment.clamp(min=0))
            assignment = merged_into.masked_fill(assignment < 0, -1)
        return x, mask, assignment


def video_entities(pfcm: PFCM, patches: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All of a video's patches through PFCM together (HVP-Net's scope: one entity can span frames).

    [B, T, P, D] patches, [B, T] frame mask -> [B, E, D] entities, [B, T * P] the entity each patch joined
    (-1 on padding frames) and [B, E, T] the frames each entity's patches come from.
    """
    batch, time, count, dim = patches.shape
    mask = None if bool(frame_mask.all()) else frame_mask.repeat_interleave(count, dim=1)
    entities, _, assignment = pfcm(patches.reshape(batch, time * count, dim), mask)
    slots = entities.shape[1]
    frame_of = torch.arange(time, device=patches.device).repeat_interleave(count).expand(batch, -1)
    slot = torch.where(assignment >= 0, assignment, slots) * time + frame_of  # padding: a column dropped below
    flat = torch.zeros(batch, (slots + 1) * time, dtype=torch.bool, device=patches.device)
    patch_frames = flat.scatter_(1, slot, True).view(batch, slots + 1, time)[:, :slots]
    return entities, assignment, patch_frames
