"""Build the retrieval model and its tokenizer from `ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import open_clip
from torch import Tensor

from hvd.config import WARM_START, ModelConfig, check_section, check_values
from hvd.model.backbone import ClipBackbone
from hvd.model.heads import EERCFHead, HCMIHead, Head, HVDHead, HVPHead, MeanPoolHead, XPoolHead
from hvd.model.model import RetrievalModel
from hvd.model.presets import preset_config
from hvd.model.pretrained import load_pretrained

HEADS: dict[str, Callable[[ClipBackbone, ModelConfig], Head]] = {
    "hvd": lambda backbone, cfg: HVDHead(backbone.embed_dim, cfg),
    "meanp": lambda backbone, cfg: MeanPoolHead(),
    "xpool": lambda backbone, cfg: XPoolHead(backbone.embed_dim),
    "eercf": lambda backbone, cfg: EERCFHead(backbone.embed_dim, cfg, backbone.clip.transformer, backbone.context_length),
    "hvp": lambda backbone, cfg: HVPHead(backbone.embed_dim, cfg, backbone.vision_depth),
    "hcmi": lambda backbone, cfg: HCMIHead(backbone.embed_dim, cfg, backbone.clip.transformer, backbone.context_length),
}


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
