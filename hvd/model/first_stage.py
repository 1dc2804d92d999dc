"""A first stage worth its name: the global caption and video embeddings a gallery index stores and FAISS
searches, trained with the head so that stage 1's top k holds the videos the full score ranks first.

Two linear maps, one per side, on the head's own global embeddings (`Head.text_embedding`,
`Head.video_embedding`: the sentence and the mean frame unless the head has its own), identity at the start and
normalised after, so an untrained first stage ranks as the head's embeddings do (unit vectors for every head
but EERCF, whose weighted coarse embeddings it normalises). Its loss term
(`model.first_stage.weight`) mixes its own InfoNCE with a distillation towards the full score's softmax over the
batch (`model.first_stage.distill`). The teacher and its temperature are detached: the full score never moves
towards stage 1; stage 1, and the encoders beneath its embeddings, move towards it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hvd.model.losses import symmetric_infonce


def _identity(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim, bias=False)
    nn.init.eye_(layer.weight)
    return layer


class FirstStage(nn.Module):
    def __init__(self, dim: int, weight: float, distill: float):
        super().__init__()
        self.text = _identity(dim)
        self.video = _identity(dim)
        self.weight, self.distill = weight, distill

    def embed_text(self, embedding: Tensor) -> Tensor:
        """[N, D] the head's caption embeddings -> stage 1's, unit length."""
        return F.normalize(self.text(embedding.float()), dim=-1)

    def embed_video(self, embedding: Tensor) -> Tensor:
        """[N, D] the head's video embeddings -> stage 1's, unit length: what a gallery index stores."""
        return F.normalize(self.video(embedding.float()), dim=-1)

    def loss(self, text_embedding: Tensor, video_embedding: Tensor, full_score: Tensor, scale: Tensor) -> Tensor:
        """The weighted stage-1 term of a batch: pair i the positive; `full_score` [B, B] the head's combined
        similarities, the distillation's teacher. The teacher and the temperature (`scale`, the head's) are
        detached here: stage 1 learns from them, never moves them."""
        scale = scale.detach()
        coarse = scale * self.embed_text(text_embedding) @ self.embed_video(video_embedding).T
        own = symmetric_infonce(coarse)
        imitation = ranking_distillation(coarse, scale * full_score.detach())
        return self.weight * ((1 - self.distill) * own + self.distill * imitation)


def ranking_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """KL divergence from the teacher's softmax to the student's, over each caption's videos (rows) and each
    video's captions (columns), averaged: the student learns the teacher's whole ranking of the batch, not only
    which pair is positive."""

    def one_way(s: Tensor, t: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")

    return (one_way(student, teacher) + one_way(student.T, teacher.T)) / 2


def build_first_stage(dim: int, weight: float, distill: float) -> FirstStage | None:
    """The trained first stage, or None when its weight is 0 (the model's state dict is then as before)."""
    return FirstStage(dim, weight, distill) if weight > 0 else None


