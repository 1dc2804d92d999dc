"""Build the retrieval model and its tokenizer from `ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable

import open_clip
from torch import Tensor, nn

from hvd.config import ModelConfig
from hvd.model.backbone import ClipBackbone
from hvd.model.heads import HVDHead, MeanPoolHead
from hvd.model.model import RetrievalModel
from hvd.model.presets import preset_config
from hvd.model.pretrained import load_pretrained


def _check(cfg: ModelConfig) -> None:
    checks = {
        "model.frame_keep": 0 < cfg.frame_keep <= 1,
        "model.pfcm_ratio": 0 < cfg.pfcm_ratio <= 1,
        "model.pfcm_steps": cfg.pfcm_steps >= 0,
        "model.dpc_k": cfg.dpc_k >= 1,
        "model.score_budget_mb": cfg.score_budget_mb >= 1,
    }
    for key, ok in checks.items():
        if not ok:
            value = getattr(cfg, key.split(".")[1])
            raise ValueError(f"bad value for '{key}': {value!r} (shares lie in (0, 1], counts are positive)")
    if cfg.pfcm_scope not in PFCM_SCOPES:
        raise ValueError(f"bad value for 'model.pfcm_scope': {cfg.pfcm_scope!r} (choose one of {', '.join(PFCM_SCOPES)})")


PFCM_SCOPES = ("frame", "video")


def _build_head(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.head == "hvd":
        return HVDHead(dim, cfg)
    if cfg.head == "meanp":
        return MeanPoolHead()
    raise ValueError(f"bad value for 'model.head': {cfg.head!r} (choose one of hvd, meanp)")


def build_model(cfg: ModelConfig) -> RetrievalModel:
    """A randomly initialised model of `cfg.preset`, then `cfg.pretrained` loaded when set."""
    _check(cfg)
    backbone = ClipBackbone(open_clip.CLIP(**preset_config(cfg.preset, cfg.quick_gelu)))
    model = RetrievalModel(backbone, _build_head(cfg, backbone.embed_dim), cfg.score_budget_mb)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


def build_tokenizer(cfg: ModelConfig, max_words: int) -> Callable[[list[str]], Tensor]:
    """open_clip's CLIP tokenizer: captions -> token ids [B, min(max_words, preset context)]."""
    if max_words < 3:
        raise ValueError(f"bad value for 'data.max_words': {max_words} (start and end tokens take 2)")
    context = preset_config(cfg.preset, cfg.quick_gelu)["text_cfg"].get("context_length", 77)
    return open_clip.SimpleTokenizer(context_length=min(max_words, context))
