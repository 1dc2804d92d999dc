"""Score a gallery: exhaustively (every pair through the model) or in two stages (EERCF-style).

Two-stage: stage 1 ranks every candidate by the global embeddings' dot product (one matrix product, or
a search of the gallery's FAISS index when one is given); stage 2 rescores each query's top-k with the
full pairwise score. Both give full [queries, candidates]
ranking matrices, so the metrics code never needs to know which mode produced them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hvd.eval.encode import score_all
from hvd.gallery import GalleryIndex
from hvd.model import RetrievalModel, TextFeatures, VideoFeatures

GATHER_BYTES = 256 * 2**20  # candidate features `rescore_gathered` holds at once


@dataclass
class Retrieval:
    t2v: Tensor  # [texts, videos]: each caption's ranking of the videos
    v2t: Tensor  # [videos, texts]: each video's ranking of the captions
    timings_s: dict[str, float] = field(default_factory=dict)
    rescored: Tensor | None = None  # [texts, videos] bool: the t2v pairs stage 2 scored (None: all of them)
    coarse: Tensor | None = None  # [texts, videos] stage 1's scores (two-stage only)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Stage 2 on the CPU runs many small ops (one query's k candidates each): too small to share out,
    and waking a thread pool per op costs more than it saves, badly so on a busy machine."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def exhaustive(model: RetrievalModel, text: TextFeatures, video: VideoFeatures) -> Retrieval:
    """One score matrix for both directions, every pair through the model, chunked to its memory budget."""
    started = time.perf_counter()
    scores = score_all(model, text, video)
    _sync(scores.device)
    return Retrieval(scores, scores.T, {"exhaustive_s": time.perf_counter() - started})


def merge_reranked(coarse: Tensor, candidates: Tensor, fine: Tensor) -> Tensor:
    """Ranking scores [Q, C]: the candidates with their fine scores, all strictly above the other
    candidates, which keep their stage-1 order (their coarse scores shifted below the lowest fine one).

    coarse: [Q, C] stage-1 scores; candidates: [Q, k] indices; fine: [Q, k] stage-2 scores.
    """
    merged = coarse.scatter(1, candidates, float("-inf"))
    if candidates.shape[1] < coarse.shape[1]:
        best_rest = merged.max(dim=1, keepdim=True).values
        merged = merged - best_rest + fine.min(dim=1, keepdim=True).values - 1.0
    return merged.scatter(1, candidates, fine.to(merged.dtype))


def top_candidates(coarse: Tensor, topk: int) -> Tensor:
    """[Q, min(topk, C)] indices of each query's best stage-1 candidates."""
    return coarse.topk(min(topk, coarse.shape[1]), dim=1).indices


def rescore_videos(
    model: RetrievalModel, text: TextFeatures, video: VideoFeatures, candidates: Tensor
) -> Tensor:
    """[texts, k] full-model scores of each caption's candidate videos: every caption in one chunked pass
    where the head scores groups, else one `score` call per caption (about 1 ms each on a CPU, whatever k)."""
    if model.head.scores_groups:
        return model.score_groups(text, video, candidates, videos_of_text=True)
    return torch.stack([model.score(text[q : q + 1], video[candidates[q]])[0] for q in range(len(candidates))])


def rescore_gathered(
    model: RetrievalModel, text: TextFeatures, gather: Callable[[Tensor], VideoFeatures], candidates: Tensor
) -> Tensor:
    """`rescore_videos` reading only the candidates' features: `gather` maps sorted gallery rows to their
    features (a memory-mapped index, a gallery built on the fly), so the gallery never has to be in memory;
    blocks of queries whose candidates take at most GATHER_BYTES."""
    row_bytes = gather(candidates[:1, 0].cpu()).row_bytes()
    block = max(1, GATHER_BYTES // max(1, candidates.shape[1] * row_bytes))
    scores = []
    for start in range(0, len(candidates), block):
        rows, local = candidates[start : start + block].unique(return_inverse=True)
        scores.append(rescore_videos(model, text[start : start + block], gather(rows).to(model.device), local.to(model.device)))
    return torch.cat(scores)


def index_candidates(index: GalleryIndex, sentence: Tensor, coarse: Tensor, topk: int) -> Tensor:
    """[Q, k] each caption's stage-1 candidates found by the index; where an IVF search came back short
    (its probed lists held fewer than k videos), the exact top-k of `coarse` instead."""
    rows = index.search(sentence, topk)[1].to(coarse.device)
    short = (rows < 0).any(dim=1)
    if short.any():
        rows[short] = top_candidates(coarse[short], topk)
    return rows


def rescore_texts(
    model: RetrievalModel, text: TextFeatures, video: VideoFeatures, candidates: Tensor
) -> Tensor:
    """[videos, k] full-model scores of each video's candidate captions, as `rescore_videos`."""
    if model.head.scores_groups:
        return model.score_groups(text, video, candidates, videos_of_text=False)
    return torch.stack([model.score(text[candidates[q]], video[q : q + 1])[:, 0] for q in range(len(candidates))])


def two_stage(
    model: RetrievalModel, text: TextFeatures, video: VideoFeatures, topk: int, index: GalleryIndex | None = None
) -> Retrieval:
    """Both directions: captions rank videos, and videos rank captions, each over its own top-k.
    `index`: the gallery's index (its rows are `video`'s): captions' candidates come from its search, and
    the stored embeddings rank the rest."""
    device = model.device
    text, video = text.to(device), video.to(device)

    started = time.perf_counter()
    sentence = model.text_embeddings(text)
    pooled = model.video_embeddings(video) if index is None else index.embeddings().to(device)
    coarse = sentence @ pooled.T
    videos_of_text = top_candidates(coarse, topk) if index is None else index_candidates(index, sentence, coarse, topk)
    texts_of_video = top_candidates(coarse.T, topk)
    _sync(device)
    stage1 = time.perf_counter() - started

    started = time.perf_counter()
    with one_cpu_thread(device):
        t2v = merge_reranked(coarse, videos_of_text, rescore_videos(model, text, video, videos_of_text))
        v2t = merge_reranked(coarse.T, texts_of_video, rescore_texts(model, text, video, texts_of_video))
    _sync(device)
    stage2 = time.perf_counter() - started
    rescored = torch.zeros_like(coarse, dtype=torch.bool).scatter_(1, videos_of_text, True)
    return Retrieval(t2v, v2t, {"stage1_s": stage1, "stage2_s": stage2}, rescored, coarse)
