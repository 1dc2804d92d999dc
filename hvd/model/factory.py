"""Build the retrieval model and its tokenizer from `ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import open_clip
from torch import Tensor

from hvd.config import WARM_START, ConfigError, DataConfig, ModelConfig, check_section, check_values
from hvd.model.backbone import ClipBackbone
from hvd.model.heads import EERCFHead, HCMIHead, Head, HVDHead, HVPHead, MeanPoolHead, XPoolHead
from hvd.model.model import RetrievalModel
from hvd.model.presets import preset_config
from hvd.model.pretrained import load_pretrained

# Heads with a transformer over frames seeded from CLIP's text tower: one position per frame, as many as the
# text context has (CLIP4Clip's seqTransf).
FRAME_TRANSFORMER_HEADS = ("eercf", "hcmi")
HEADS: dict[str, Callable[[ClipBackbone, ModelConfig], Head]] = {
    "hvd": lambda backbone, cfg: HVDHead(backbone.embed_dim, cfg),
    "meanp": lambda backbone, cfg: MeanPoolHead(),
    "xpool": lambda backbone, cfg: XPoolHead(backbone.embed_dim),
    "eercf": lambda backbone, cfg: EERCFHead(backbone.embed_dim, cfg, backbone.clip.transformer, backbone.context_length),
    "hvp": lambda backbone, cfg: HVPHead(backbone.embed_dim, cfg, backbone.vision_depth),
    "hcmi": lambda backbone, cfg: HCMIHead(backbone.embed_dim, cfg, backbone.clip.transformer, backbone.context_length),
}


def check_inputs(cfg: ModelConfig, data: DataConfig) -> None:
    """What this model takes, checked before any work (else a Ray worker finds out minutes later): frames at
    the preset's image size, and no more frames than a frame transformer has positions for."""
    preset = preset_config(cfg.preset, cfg.quick_gelu)
    size, context = int(preset["vision_cfg"]["image_size"]), int(preset["text_cfg"].get("context_length", 77))
    if data.frame_size != size:
        raise ConfigError(f"bad value for 'data.frame_size': {data.frame_size} (model.preset={cfg.preset} takes "
                          f"{size} px frames)")
    if cfg.head in FRAME_TRANSFORMER_HEADS and data.num_frames > context:
        raise ConfigError(f"bad value for 'data.num_frames': {data.num_frames} (model.head={cfg.head} has a "
                          f"position for at most {context} frames on model.preset={cfg.preset})")


def build_model(cfg: ModelConfig) -> RetrievalModel:
    """A randomly initialised model of `cfg.preset`, then `cfg.pretrained` loaded when set."""
    check_section("model", cfg)
    if cfg.pretrained == WARM_START:
        raise ValueError("model.pretrained=synthetic names a warm start that hvd.train.warm_start makes; pass its file")
    backbone = ClipBackbone(open_clip.CLIP(**preset_config(cfg.preset, cfg.quick_gelu)))
    model = RetrievalModel(backbone, HEADS[cfg.head](backbone, cfg), cfg.score_budget_mb)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


def rebuild_model(cfg: ModelConfig, state: Mapping[str, Tensor]) -> RetrievalModel:
    """A trained model from its config and full state dict, in eval mode. `cfg.pretrained` is skipped: the
    state holds every weight, and the CLIP file the training machine read need not exist here."""
    model = build_model(replace(cfg, pretrained=None))
    model.load_state_dict(state)
    return model.eval()


def build_tokenizer(cfg: ModelConfig, max_words: int) -> Callable[[list[str]], Tensor]:
    """open_clip's CLIP tokenizer: captions -> token ids [B, min(max_words, preset context)]."""
    check_values({"data.max_words": max_words})
    context = preset_config(cfg.preset, cfg.quick_gelu)["text_cfg"].get("context_length", 77)
    return open_clip.SimpleTokenizer(context_length=min(max_words, context))
