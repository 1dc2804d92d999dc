"""The HVD text-video retrieval model: CLIP tokens, FFSM frame selection, PFCM patch compression.

Names are imported on first use (PEP 562), so `hvd.model.presets` (what a preset takes, checked before a run
starts) imports without torch or open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvd.model.factory import build_model, build_tokenizer, rebuild_model
    from hvd.model.features import TextFeatures, VideoFeatures
    from hvd.model.model import IMAGE_MEAN, IMAGE_STD, RetrievalModel
    from hvd.model.presets import check_inputs
    from hvd.model.pretrained import load_pretrained, save_weights

_HOMES = {
    "build_model": "factory", "build_tokenizer": "factory", "rebuild_model": "factory",
    "TextFeatures": "features", "VideoFeatures": "features",
    "IMAGE_MEAN": "model", "IMAGE_STD": "model", "RetrievalModel": "model",
    "check_inputs": "presets",
    "load_pretrained": "pretrained", "save_weights": "pretrained",
}

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "RetrievalModel",
    "TextFeatures",
    "VideoFeatures",
    "build_model",
    "build_tokenizer",
    "check_inputs",
    "load_pretrained",
    "rebuild_model",
    "save_weights",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
