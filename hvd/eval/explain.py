"""What a head's score looked at for a few (caption, video) pairs: HVD's kept frames and PFCM entities,
X-Pool's frame attention, EERCF's text gate, HCMI's clips.

These feed the pictures in the evaluation report; the head computes them (its `explain`, and the picture's
legend `explain_legend`), this module only gathers the inputs (the video's frames from the shards) and the
outputs for plotting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from hvd.data.shards import frame_mask, frames_uint8
from hvd.eval.encode import Tokenizer
from hvd.model import RetrievalModel


@dataclass
class PairExplanation:
    caption: str
    video_id: str
    rank: int  # of the ground-truth video for this caption, as the report ranked it
    frames: np.ndarray  # [T, H, W, 3] uint8, as the model saw them
    valid: np.ndarray  # [T] bool, False on padding frames
    frame_scores: np.ndarray  # [T] what the head weighs each frame by (HVD: caption-frame cosine, FFSM's ranking)
    kept: np.ndarray  # [T] bool, the frames the head kept or favoured for this pair
    entities: np.ndarray | None  # [T, grid, grid] the PFCM entity each patch was merged into (-1: padding); None
    legend: str  # what the picture shows, from the head
    groups: np.ndarray | None = None  # [T] the clip each frame was clustered into (HCMI; -1: padding)
    # [T] the share of the head's frame pooling each frame gets: uniform over `kept` for heads that select
    frame_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.frame_weights is None:
            self.frame_weights = self.kept / max(int(self.kept.sum()), 1)


def can_explain(model: RetrievalModel) -> bool:
    return hasattr(model.head, "explain")


def pick_queries(num_captions: int, count: int) -> list[int]:
    """`count` captions spread evenly over the split, so the pictures are not all of one kind of clip."""
    return sorted({round(i) for i in np.linspace(0, num_captions - 1, min(count, num_captions))})


def video_rows(shards: str | Path, split: str, video_ids: list[str]) -> dict[str, dict]:
    """The shard rows (frames included) of `video_ids` in one split, by video id."""
    table = pq.read_table(Path(shards) / split, filters=[("video_id", "in", video_ids)])
    return {row["video_id"]: row for row in table.to_pylist()}


@torch.no_grad()
def explain_pairs(
    model: RetrievalModel,
    tokenizer: Tokenizer,
    shards: str | Path,
    split: str,
    pairs: list[tuple[str, str, int]],
) -> list[PairExplanation]:
    """`pairs`: (caption, video_id, rank) triples; the model must have an explaining head (`can_explain`)."""
    rows = video_rows(shards, split, sorted({video_id for _, video_id, _ in pairs}))
    return [explain_row(model, tokenizer, caption, rows[video_id], rank) for caption, video_id, rank in pairs]


@torch.no_grad()
def explain_row(model: RetrievalModel, tokenizer: Tokenizer, caption: str, row: dict, rank: int = 0) -> PairExplanation:
    """What the head's score of `caption` against one shard row's video looked at."""
    frames = frames_uint8(row)
    sentence = model.encode_text(tokenizer([caption])).sentence[0]
    images = model.normalize_frames(torch.from_numpy(frames)[None])[0]
    pooled, patches, _ = model.backbone.encode_images(images, with_patches=True)
    mask = torch.from_numpy(frame_mask([row])[0]).to(model.device)
    parts = model.head.explain(sentence, F.normalize(pooled.float(), dim=-1), patches.float(), mask)
    grid = int(np.sqrt(patches.shape[1]))
    return PairExplanation(
        caption=caption,
        video_id=row["video_id"],
        rank=rank,
        frames=frames,
        valid=mask.cpu().numpy(),
        frame_scores=parts["frame_scores"].cpu().numpy(),
        kept=parts["kept"].cpu().numpy(),
        entities=parts["entities"].reshape(-1, grid, grid).cpu().numpy() if "entities" in parts else None,
        legend=model.head.explain_legend,
        groups=parts["groups"].cpu().numpy() if "groups" in parts else None,
        frame_weights=parts["frame_weights"].cpu().numpy() if "frame_weights" in parts else None,
    )
