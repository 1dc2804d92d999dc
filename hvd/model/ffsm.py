"""FFSM, the macro-perception step of HVD: for every (caption, video) pair, keep the frames the caption is about."""

from __future__ import annotations

import torch
from torch import Tensor

from hvd.model.clustering import keep_count


def select_frames(sentence: Tensor, frames: Tensor, keep: float) -> Tensor:
    """[Nt, Nv, T] bool: the ceil(T * keep) frames of each video most cosine-similar to each caption.

    `sentence` [Nt, D] and `frames` [Nv, T, D] are unit vectors.
    """
    similarity = torch.einsum("td,vkd->tvk", sentence, frames)
    top = similarity.topk(keep_count(frames.shape[1], keep), dim=-1).indices
    return torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, top, True)
