"""Encoded batches of captions and videos, kept apart so that evaluation can encode once and score later.

Every field is an L2-normalised feature (or a mask) whose first dimension is the batch, so moving,
slicing, concatenating and gathering across ranks are one tensor operation applied to each field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

FeaturesT = TypeVar("FeaturesT", bound="Features")


@dataclasses.dataclass
class Features:
    def map(self: FeaturesT, fn: Callable[[Tensor], Tensor]) -> FeaturesT:
        """The same features with `fn` applied to every field."""
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self: FeaturesT, device: torch.device | str) -> FeaturesT:
        return self.map(lambda t: t.to(device))

    def __getitem__(self: FeaturesT, index: slice | Tensor) -> FeaturesT:
        return self.map(lambda t: t[index])

    def __len__(self) -> int:
        return self._first().shape[0]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def row_bytes(self) -> int:
        """Bytes one item takes, every field together."""
        return sum(math.prod(t.shape[1:]) * t.element_size() for t in (getattr(self, f.name) for f in dataclasses.fields(self)))

    @property
    def device(self) -> torch.device:
        return self._first().device

    def _first(self) -> Tensor:
        return getattr(self, dataclasses.fields(self)[0].name)

    @classmethod
    def cat(cls: type[FeaturesT], parts: Sequence[FeaturesT], pad: bool = False) -> FeaturesT:
        """Batches one after another; with `pad`, [B, L, ...] fields of different L (captions' words, a head's
        entities) padded to the longest, as empty slots: zeros, False in masks."""
        if not parts:
            raise ValueError(f"{cls.__name__}.cat needs at least one batch")
        fields = {}
        for f in dataclasses.fields(cls):
            tensors = [getattr(p, f.name) for p in parts]
            if pad and tensors[0].ndim >= 2:
                longest = max(t.shape[1] for t in tensors)
                tensors = [pad_to(t, longest) for t in tensors]
            fields[f.name] = torch.cat(tensors)
        return cls(**fields)


def pad_to(tensor: Tensor, length: int) -> Tensor:
    """A [B, L, ...] tensor padded along L to `length` with zeros (False for a mask): empty slots."""
    if tensor.shape[1] == length:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:])], dim=1)


@dataclasses.dataclass
class TextFeatures(Features):
    sentence: Tensor  # [B, D] end-of-text token
    words: Tensor  # [B, L, D] every token
    word_mask: Tensor  # [B, L] bool, False on padding


@dataclasses.dataclass
class VideoFeatures(Features):
    frames: Tensor  # [B, T, D] class token of every frame
    frame_mask: Tensor  # [B, T] bool, False on padding frames (clips shorter than T frames)
    patches: Tensor  # [B, E, D] entities: patch tokens after the head's compression; E = 0 for meanp
    patch_frames: Tensor  # [B, E, T] bool: the frames each entity's patches come from (none: empty slot)
    frame_views: Tensor  # [B, K, T, D] frame features a head derives besides `frames` (EERCF: contextualised; HVP-Net: earlier blocks'); K = 0 for most
