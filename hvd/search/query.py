"""Search an indexed gallery with a caption: the index's top-k by first-stage embedding, rescored by the
full model, best first; and what the user looks at next, each result's frames with those the head kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hvd.data.shards import frame_mask, frames_uint8
from hvd.eval.encode import Tokenizer
from hvd.eval.explain import PairExplanation, can_explain, explain_pairs, video_rows
from hvd.eval.retrieval import embedded_frames, frame_shortlist, rescore_gathered
from hvd.gallery import GalleryIndex
from hvd.model import RetrievalModel


@dataclass(frozen=True)
class SearchHit:
    rank: int
    video_id: str
    score: float  # the full model's
    stage1_score: float  # the first stage's, which picked the candidates


@torch.no_grad()
def search(
    model: RetrievalModel, tokenizer: Tokenizer, index: GalleryIndex, queries: list[str], topk: int, top: int,
    nprobe: int | None = None, shortlist: int = 0, top_frames: int = 3,
) -> list[list[SearchHit]]:
    """For each caption of `queries`, the `top` best of the index's `topk` first-stage candidates by the full
    score; the captions are encoded and rescored together. `shortlist` > topk: the index's best `shortlist`,
    re-ranked by their frames (`hvd.eval.retrieval.stage1_videos`), give the `topk` candidates."""
    text = model.encode_text(tokenizer(queries))
    sentence = model.text_embeddings(text)
    coarse, rows = index.search(sentence, max(topk, shortlist), nprobe)
    gather = functools.partial(index.features, kind=model.head.video_side_type)  # as the index job derived them

    def stage2_candidates(q: slice, rows: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions `q`'s candidates for stage 2 and their stage-1 scores."""
        if shortlist <= topk:
            return rows, coarse
        frames_of = index.frame_embeddings if index.has_frames else embedded_frames(model, index.features)
        framed, best = frame_shortlist(sentence[q], frames_of, rows, topk, top_frames)
        best = best.cpu()
        return rows.gather(1, best), framed.cpu().gather(1, best)

    if bool((rows >= 0).all()):  # every caption got its candidates: one rescoring pass for all
        rows, stage1 = stage2_candidates(slice(None), rows, coarse)
        fine = rescore_gathered(model, text, gather, rows.to(model.device)).cpu()
        found = [(rows[q], stage1[q], fine[q]) for q in range(len(queries))]
    else:  # an IVF search came back short (-1 rows), each caption differently
        found = []
        for q in range(len(queries)):
            kept = rows[q] >= 0
            chosen, stage1 = stage2_candidates(slice(q, q + 1), rows[q][kept][None], coarse[q][kept][None])
            scores = rescore_gathered(model, text[q : q + 1], gather, chosen.to(model.device))[0]
            found.append((chosen[0], stage1[0], scores.cpu()))
    return [
        [SearchHit(rank + 1, index.video_ids[int(candidates[i])], float(scores[i]), float(stage1[i]))
         for rank, i in enumerate(scores.argsort(descending=True, stable=True)[:top])]
        for candidates, stage1, scores in found
    ]


def hit_frames(
    model: RetrievalModel, tokenizer: Tokenizer, shards: str | Path, split: str, query: str, hits: list[SearchHit]
) -> list[PairExplanation]:
    """Each hit's frames from the shards, with the frames the head kept for `query` where it can say
    (`can_explain`); other heads weigh every frame alike, so all count as kept."""
    if not Path(shards, split).is_dir():
        raise FileNotFoundError(f"the contact sheet needs the gallery's frames: no {split} shards under {shards}")
    pairs = [(query, hit.video_id, hit.rank) for hit in hits]
    if can_explain(model):
        return explain_pairs(model, tokenizer, shards, split, pairs)
    rows = video_rows(shards, split, [hit.video_id for hit in hits])
    explained = []
    for hit in hits:
        row = rows[hit.video_id]
        valid = frame_mask([row])[0]
        explained.append(PairExplanation(
            caption=query, video_id=hit.video_id, rank=hit.rank, frames=frames_uint8(row), valid=valid,
            frame_scores=np.zeros(len(valid), np.float32), kept=valid, entities=None,
            legend=f"{model.head.__class__.__name__} weighs every frame alike",
        ))
    return explained
