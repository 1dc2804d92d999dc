"""The HVD text-video retrieval model: CLIP tokens, FFSM frame selection, PFCM patch compression."""

from hvd.model.factory import build_model, build_tokenizer, check_inputs, rebuild_model
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.model import IMAGE_MEAN, IMAGE_STD, RetrievalModel
from hvd.model.pretrained import load_pretrained, save_weights

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
