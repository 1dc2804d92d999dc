"""X-Pool (Gorti et al., CVPR 2022): the caption attends to a video's frames, and is compared with what it pooled.

As X-Pool's own code builds it: one LayerNorm on both sides, single-head scaled dot-product attention
with the caption as query and the frames as keys and values, the output projection, a LayerNorm, a
residual linear layer (its output through dropout, `model.xpool.dropout`, X-Pool's 0.3) and a last LayerNorm;
every projection starts as the identity (X-Pool initialises
them so), so at step 0 the pooled video is a caption-weighted mean of normalised frames. The score is
the cosine of the sentence and its own pooled video. Padding frames get no attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvd.config import XPoolHeadConfig
from hvd.model.backbone import ClipBackbone
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.heads.base import FLOAT_BYTES, Head, masked_softmax


def _identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class XPoolHead(Head):
    explain_legend = "frames: the caption's X-Pool attention weight; frames above a uniform weight framed green"

    def __init__(self, dim: int, cfg: XPoolHeadConfig):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.query, self.key, self.value, self.out = (_identity_linear(dim) for _ in range(4))
        self.norm_attended = nn.LayerNorm(dim)
        self.residual = _identity_linear(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm_out = nn.LayerNorm(dim)

    @classmethod
    def build(cls, backbone: ClipBackbone, cfg: XPoolHeadConfig) -> XPoolHead:
        return cls(backbone.embed_dim, cfg)

    scores_groups = True

    def attention(self, sentence: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """[Nt, Nv, T]: how much each caption's pooling weighs each frame of each video."""
        query, key = self.query(self.norm_in(sentence)), self.key(self.norm_in(frames))  # [Nt, D], [Nv, T, D]
        return masked_softmax(torch.einsum("td,vkd->tvk", query, key) / math.sqrt(query.shape[-1]), frame_mask)

    def pooled(self, sentence: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """[Nt, Nv, D] unit video feature pooled by each caption."""
        attended = torch.einsum("tvk,vkd->tvd", self.attention(sentence, frames, frame_mask),
                                self.value(self.norm_in(frames)))
        return self._project(attended)

    def pair_pooled(self, sentence: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """[P, D] unit video feature of P (caption, video) pairs: sentence [P, D], frames [P, T, D]."""
        query, normed = self.query(self.norm_in(sentence)), self.norm_in(frames)
        weights = masked_softmax(torch.einsum("pd,ptd->pt", query, self.key(normed)) / math.sqrt(query.shape[-1]),
                                 frame_mask)
        return self._project(torch.einsum("pt,ptd->pd", weights, self.value(normed)))

    def _project(self, attended: Tensor) -> Tensor:
        pooled = self.norm_attended(self.out(attended))
        return F.normalize(self.norm_out(pooled + self.dropout(self.residual(pooled))), dim=-1)

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        pooled = self.pooled(text.sentence, video.frames, video.frame_mask)
        return {"sentence_pooled": torch.einsum("td,tvd->tv", text.sentence, pooled)}

    def pair_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        pooled = self.pair_pooled(text.sentence, video.frames, video.frame_mask)
        return {"sentence_pooled": (text.sentence * pooled).sum(dim=-1)}

    @torch.no_grad()
    def explain(self, sentence: Tensor, frames: Tensor, patches: Tensor, frame_mask: Tensor) -> dict[str, Tensor]:
        """One pair's frame attention (`frame_scores`, [T]); the frames it weighs above uniform are `kept`."""
        weights = self.attention(sentence[None], frames[None], frame_mask[None])[0, 0]
        return {"frame_scores": weights, "kept": weights > 1 / frame_mask.sum(), "frame_weights": weights}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        frames, dim = video.frames.shape[1:]
        return FLOAT_BYTES * (3 * frames + 6 * dim)  # logits and weights; the pooled feature through its layers
