"""The CLIP4Clip meanP baseline: cosine of the sentence and the mean frame feature."""

from __future__ import annotations

from torch import Tensor

from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.heads.base import FLOAT_BYTES, Head, mean_frame_embedding


class MeanPoolHead(Head):
    scores_groups = True
    explain_legend = "frames: caption-frame cosine; mean pooling weighs every frame alike"

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        return {"sentence_video": text.sentence @ mean_frame_embedding(video.frames, video.frame_mask).T}

    def grouped_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        pooled = mean_frame_embedding(video.frames.flatten(0, -3), video.frame_mask.flatten(0, -2))
        pooled = pooled.view(*video.frame_mask.shape[:-1], -1)  # [Q, k, D], or [Q, D] for one video per query
        sentence = text.sentence
        if sentence.ndim == 2:  # each caption, its k videos
            sentence = sentence[:, None]
        else:  # each video, its k captions
            pooled = pooled[:, None]
        return {"sentence_video": (sentence * pooled).sum(dim=-1)}

    def explain(self, sentence: Tensor, frames: Tensor, patches: Tensor, frame_mask: Tensor) -> dict[str, Tensor]:
        """Every valid frame kept and weighed alike: the baseline the other heads' frame choices are read against."""
        return {"frame_scores": frames @ sentence, "kept": frame_mask,
                "frame_weights": frame_mask.float() / frame_mask.sum()}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        return FLOAT_BYTES
