"""Build the retrieval model and its tokenizer from `ModelConfig`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import replace

import open_clip
from torch import Tensor

from hvd.config import HEADS, WARM_START, ModelConfig, check_section, check_values
from hvd.model.backbone import ClipBackbone
from hvd.model.first_stage import build_first_stage
from hvd.model.heads import Head
from hvd.model.model import RetrievalModel
from hvd.model.presets import preset_config
from hvd.model.pretrained import load_pretrained


def head_class(name: str) -> type[Head]:
    """The class `hvd.config.HEADS` names for head `name`, imported now (configs load without torch)."""
    module, _, cls = HEADS[name].builder.partition(":")
    return getattr(importlib.import_module(module), cls)


def build_model(cfg: ModelConfig) -> RetrievalModel:
    """A randomly initialised model of `cfg.preset`, then `cfg.pretrained` loaded when set."""
    check_section("model", cfg)
    if cfg.pretrained == WARM_START:
        raise ValueError("model.pretrained=synthetic names a warm start that hvd.train.warm_start makes; pass its file")
    backbone = ClipBackbone(open_clip.CLIP(**preset_config(cfg.preset, cfg.quick_gelu)))
    stage1 = build_first_stage(backbone.embed_dim, cfg.first_stage.weight, cfg.first_stage.distill)
    model = RetrievalModel(backbone, head_class(cfg.head).build(backbone, cfg.head_config()), cfg.score_budget_mb, stage1)
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
