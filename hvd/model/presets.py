"""Backbone presets: open_clip model configs by name, plus a `tiny` one sized for 2 CPU cores.

`tiny` keeps CLIP's architecture and BPE vocabulary so that everything downstream (tokenizer,
checkpoint layout, feature shapes) is the same code path as ViT-B/32, only smaller: 64 px frames cut
into 4 x 4 patches of 16 px with fixed 2-D sin-cos positions, 4-layer towers of width 128, 32 text
tokens, a 128-d joint space.
`tiny-p8` is the same with 8 px patches (8 x 8 per frame): an entity at `synthetic.entity_scale` 0.15-0.3
covers a few patches, so PFCM has parts to group; it costs about twice as much per frame
(docs/benchmarks.md).
"""

from __future__ import annotations

import copy
from typing import Any

from hvd.config import CHOICES, HEADS, ConfigError, DataConfig, ModelConfig

TINY: dict[str, Any] = {
    "embed_dim": 128,
    # Fixed 2-D sin-cos positions (as MAE): from scratch, learned ones were slower to train on the stills
    # (held-out t2i R@1 15.4 vs 20.8 after 850 steps, docs/benchmarks.md).
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 64,
                   "pos_embed_type": "sin_cos_2d"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}

TINY_P8: dict[str, Any] = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_size": 8}}
OPEN_CLIP_PRESETS = ("ViT-B-32", "ViT-B-16")
PRESETS = CHOICES["model.preset"]
TINY_PRESETS = {"tiny": TINY, "tiny-p8": TINY_P8}


def preset_config(name: str, quick_gelu: bool) -> dict[str, Any]:
    """The open_clip `CLIP(**config)` keyword arguments of a preset (open_clip is imported for its own
    presets only: the tiny ones are checked without it)."""
    if name in TINY_PRESETS:
        config = copy.deepcopy(TINY_PRESETS[name])
    elif name in OPEN_CLIP_PRESETS:
        import open_clip

        config = open_clip.get_model_config(name)
    else:
        raise ValueError(f"model.preset: unknown preset {name!r} (choose one of {', '.join(PRESETS)})")
    config["quick_gelu"] = quick_gelu
    return config


def check_inputs(cfg: ModelConfig, data: DataConfig) -> None:
    """What this model takes, checked before any work (else a Ray worker finds out minutes later): frames at
    the preset's image size, and no more frames than a frame transformer has positions for."""
    preset = preset_config(cfg.preset, cfg.quick_gelu)
    size, context = int(preset["vision_cfg"]["image_size"]), int(preset["text_cfg"].get("context_length", 77))
    if data.frame_size != size:
        raise ConfigError(f"bad value for 'data.frame_size': {data.frame_size} (model.preset={cfg.preset} takes "
                          f"{size} px frames)")
    if HEADS[cfg.head].frame_transformer and data.num_frames > context:
        raise ConfigError(f"bad value for 'data.num_frames': {data.num_frames} (model.head={cfg.head} has a "
                          f"position for at most {context} frames on model.preset={cfg.preset})")
