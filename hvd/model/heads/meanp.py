"""The CLIP4Clip meanP baseline: cosine of the sentence and the mean frame feature."""

from __future__ import annotations

from torch import Tensor

from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.heads.base import FLOAT_BYTES, Head, mean_frame_embedding


class MeanPoolHead(Head):
    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        return {"sentence_video": text.sentence @ mean_frame_embedding(video.frames, video.frame_mask).T}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        return FLOAT_BYTES
