"""Encode a split of prepared shards with a model, and score it: the single-process path.

Training validates with it on rank 0 every epoch; the batch evaluation job uses the same functions
inside Ray Data actors for large galleries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from hvd.data.shards import frame_mask, frames_uint8
from hvd.eval.metrics import retrieval_metrics
from hvd.model import RetrievalModel, TextFeatures, VideoFeatures
from hvd.runtime.progress import Progress

Tokenizer = Callable[[list[str]], Tensor]


@dataclass
class EncodedSplit:
    text: TextFeatures
    video: VideoFeatures
    text_video: Tensor  # [captions]: index of the video each caption describes
    video_ids: list[str]
    captions: list[str]


def encode_rows(model: RetrievalModel, rows: list[Mapping[str, Any]]) -> VideoFeatures:
    """Shard rows -> video features: frames go to the model's device as uint8 and are normalised there."""
    frames = torch.from_numpy(np.stack([frames_uint8(row) for row in rows]))
    return model.encode_video(model.normalize_frames(frames), torch.from_numpy(frame_mask(rows)))


@torch.no_grad()
def encode_split(model: RetrievalModel, table: pa.Table, tokenizer: Tokenizer, batch_size: int = 32) -> EncodedSplit:
    """Every video and every caption of `table` (rows of a shard split), in batches."""
    was_training = model.training
    model.eval()
    rows = table.to_pylist()
    captions = [caption for row in rows for caption in row["captions"]]
    text_video = torch.tensor([index for index, row in enumerate(rows) for _ in row["captions"]])
    videos, texts = [], []
    progress = Progress(len(rows), "encoding videos")
    for i in range(0, len(rows), batch_size):
        videos.append(encode_rows(model, rows[i : i + batch_size]))
        progress.advance(len(videos[-1]))
    progress = Progress(len(captions), "encoding captions")
    for i in range(0, len(captions), batch_size):
        texts.append(model.encode_text(tokenizer(captions[i : i + batch_size])))
        progress.advance(len(texts[-1]))
    model.train(was_training)
    return EncodedSplit(
        text=TextFeatures.cat(texts).to("cpu"),
        video=VideoFeatures.cat(videos).to("cpu"),
        text_video=text_video,
        video_ids=[row["video_id"] for row in rows],
        captions=captions,
    )


def evaluate_split(
    model: RetrievalModel, table: pa.Table, tokenizer: Tokenizer, batch_size: int = 32, dsl: bool = False
) -> dict[str, float]:
    """Exhaustive retrieval metrics of one split: every caption against every video."""
    encoded = encode_split(model, table, tokenizer, batch_size)
    return retrieval_metrics(score_all(model, encoded.text, encoded.video), encoded.text_video, dsl=dsl)


def score_all(model: RetrievalModel, text: TextFeatures, video: VideoFeatures) -> Tensor:
    """Every caption against every video (`RetrievalModel.score`), with progress lines: on a large gallery the
    longest step of an evaluation."""
    return model.score(text, video, Progress(len(text) * len(video), "scoring caption-video pairs"))
