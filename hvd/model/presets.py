"""Backbone presets: open_clip model configs by name, plus a `tiny` one sized for 2 CPU cores.

`tiny` keeps CLIP's architecture and BPE vocabulary so that everything downstream (tokenizer,
checkpoint layout, feature shapes) is the same code path as ViT-B/32, only smaller: 64 px frames cut
into 4 x 4 patches of 16 px, 4-layer towers of width 128, 32 text tokens, a 128-d joint space.
"""

from __future__ import annotations

import copy
from typing import Any

import open_clip

from hvd.config import CHOICES

TINY: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}

OPEN_CLIP_PRESETS = ("ViT-B-32", "ViT-B-16")
PRESETS = CHOICES["model.preset"]


def preset_config(name: str, quick_gelu: bool) -> dict[str, Any]:
    """The open_clip `CLIP(**config)` keyword arguments of a preset."""
    if name == "tiny":
        config = copy.deepcopy(TINY)
    elif name in OPEN_CLIP_PRESETS:
        config = open_clip.get_model_config(name)
    else:
        raise ValueError(f"model.preset: unknown preset {name!r} (choose one of {', '.join(PRESETS)})")
    config["quick_gelu"] = quick_gelu
    return config
