"""Score a gallery: exhaustively (every pair through the model) or in two stages (EERCF-style).

Two-stage: stage 1 ranks every candidate by the global embeddings' dot product (one matrix product, or
a search of the gallery's FAISS index when one is given), optionally re-ranking captions' best few hundred
videos by their frames (`eval.shortlist`); stage 2 rescores each query's top-k with the full pairwise score.
Both give full [queries, candidates] ranking matrices, so the metrics code never needs to know which mode
produced them.
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
    coarse: Tensor | None = None  # [texts, videos] stage 1's ranking scores (two-stage only)


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
    where the head scores groups (the head's video side derived first, once per video: `video_side`), else
    one `score` call per caption (about 1 ms each on a CPU, whatever k)."""
    if model.head.scores_groups:
        return model.score_groups(text, model.video_side(video), candidates, videos_of_text=True)
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


def mean_of_best_frames(cosines: Tensor, frame_mask: Tensor, top_frames: int) -> Tensor:
    """[...] from a caption's cosines with each frame [..., T]: the mean of the best `top_frames` real frames (a clip
    with fewer real frames: the mean of all of them). `frame_mask` broadcasts to `cosines`; padding never counts."""
    best = cosines.masked_fill(~frame_mask, float("-inf")).topk(min(top_frames, cosines.shape[-1]), dim=-1).values
    counted = frame_mask.sum(dim=-1).clamp(min=1, max=top_frames)
    return best.masked_fill(best.isinf(), 0).sum(dim=-1) / counted


def frame_scores(sentence: Tensor, frames: Tensor, frame_mask: Tensor, candidates: Tensor, top_frames: int) -> Tensor:
    """[Q, n] each caption's `mean_of_best_frames` score of its n candidate videos, from stage 1's caption embeddings
    [Q, D] and frame embeddings [N, T, D] (`RetrievalModel.frame_embeddings`, with `frame_mask` [N, T]) whose rows
    `candidates` [Q, n] index. One caption at a time: one gather of every caption's candidates was 8x slower on
    one CPU core (0.86 against 0.11 ms a caption for 200 candidates of 12 frames x 128 dimensions)."""
    n, length, dim = candidates.shape[1], frames.shape[1], frames.shape[2]
    cosines = torch.stack([  # a [n x T, D] matrix times a vector: a 3-d product broadcasts, 2.5x slower
        (frames.index_select(0, rows).view(n * length, dim).to(caption.dtype) @ caption).view(n, length)
        for caption, rows in zip(sentence.float(), candidates, strict=True)
    ])
    return mean_of_best_frames(cosines, frame_mask[candidates], top_frames)


FramesOf = Callable[[Tensor], tuple[Tensor, Tensor]]  # sorted gallery rows -> their frame embeddings, frame masks


def embedded_frames(model: RetrievalModel, gather: Callable[[Tensor], VideoFeatures]) -> FramesOf:
    """Frame embeddings computed from the rows' stored features (`gather`), for galleries that keep no frame
    embeddings of their own: the first stage's map over T frames a video, per read."""
    def frames_of(rows: Tensor) -> tuple[Tensor, Tensor]:
        chosen = gather(rows)
        return model.frame_embeddings(chosen), chosen.frame_mask

    return frames_of


def frame_shortlist(
    sentence: Tensor, frames_of: FramesOf, listed: Tensor, topk: int, top_frames: int
) -> tuple[Tensor, Tensor]:
    """`frame_scores` [Q, n] of each caption's shortlist `listed` [Q, n] of gallery rows, whose frame embeddings
    `frames_of` reads (a frame index's, or `embedded_frames`), in blocks of captions whose rows take at most
    GATHER_BYTES, and the positions [Q, k] (in `listed`) of its best k by them: the candidates stage 2 gets."""
    probe, mask = frames_of(listed[:1, 0].cpu())
    row_bytes = probe[0].numel() * probe.element_size() + mask[0].numel()
    block = max(1, GATHER_BYTES // max(1, listed.shape[1] * row_bytes))
    framed = []
    for start in range(0, len(listed), block):
        rows, local = listed[start : start + block].unique(return_inverse=True)
        frames, mask = frames_of(rows.cpu())
        framed.append(frame_scores(sentence[start : start + block], frames.to(sentence.device), mask.to(sentence.device),
                                   local.to(sentence.device), top_frames))
    framed = torch.cat(framed)
    return framed, top_candidates(framed, topk)


@dataclass
class VideoStage1:
    """Captions' stage 1: what it scored, and the candidates [Q, k] it hands stage 2."""

    coarse: Tensor  # [Q, V] the mean-frame (index) scores
    candidates: Tensor  # [Q, k] gallery rows
    listed: Tensor | None = None  # [Q, n] the shortlist its frames re-ranked (None: no frame step)
    framed: Tensor | None = None  # [Q, n] the shortlist's frame scores
    chosen: Tensor | None = None  # [Q, k] the candidates' positions in `listed`

    def ranking(self) -> Tensor:
        """[Q, V] stage 1's ranking scores: the shortlist in its frame order above the other videos."""
        return self.coarse if self.listed is None else merge_reranked(self.coarse, self.listed, self.framed)

    def merged(self, fine: Tensor) -> Tensor:
        """[Q, V] the final ranking scores: the candidates by their stage-2 scores `fine` [Q, k], then stage 1's
        ranking; one pass over the [Q, V] matrix either way (the shortlist is merged on its own first)."""
        if self.listed is None:
            return merge_reranked(self.coarse, self.candidates, fine)
        return merge_reranked(self.coarse, self.listed, merge_reranked(self.framed, self.chosen, fine))


def stage1_videos(
    model: RetrievalModel,
    sentence: Tensor,
    video: VideoFeatures,
    coarse: Tensor,
    topk: int,
    shortlist: int = 0,
    top_frames: int = 3,
    index: GalleryIndex | None = None,
    frames: Tensor | None = None,
) -> VideoStage1:
    """Stage 1 for captions, from the mean-frame scores `coarse` [Q, V] (or the index's search).
    `frames`: `video`'s frame embeddings, where already computed.

    The mean-frame embedding dilutes a short event with the clutter around it, which is what HVD's FFSM keeps
    out. With `shortlist` > topk, its best `shortlist` videos are re-ranked by the caption's cosines with their
    frames (`frame_scores`) and stage 2 takes that order's top-k."""
    wanted = max(topk, shortlist)
    listed = top_candidates(coarse, wanted) if index is None else index_candidates(index, sentence, coarse, wanted)
    if shortlist <= topk:
        return VideoStage1(coarse, listed)
    frames = model.frame_embeddings(video) if frames is None else frames
    framed = frame_scores(sentence, frames, video.frame_mask, listed, top_frames)
    chosen = top_candidates(framed, topk)
    return VideoStage1(coarse, listed.gather(1, chosen), listed, framed, chosen)


def rescore_texts(
    model: RetrievalModel, text: TextFeatures, video: VideoFeatures, candidates: Tensor
) -> Tensor:
    """[videos, k] full-model scores of each video's candidate captions, as `rescore_videos`."""
    if model.head.scores_groups:
        return model.score_groups(text, video, candidates, videos_of_text=False)
    return torch.stack([model.score(text[candidates[q]], video[q : q + 1])[:, 0] for q in range(len(candidates))])


def two_stage(
    model: RetrievalModel,
    text: TextFeatures,
    video: VideoFeatures,
    topk: int,
    index: GalleryIndex | None = None,
    shortlist: int = 0,
    top_frames: int = 3,
) -> Retrieval:
    """Both directions: captions rank videos, and videos rank captions, each over its own top-k.
    `index`: the gallery's index (its rows are `video`'s): captions' candidates come from its search, and
    the stored embeddings rank the rest. `shortlist`, `top_frames`: captions' stage 1 re-ranks its best
    `shortlist` videos by their frames first (`stage1_videos`)."""
    device = model.device
    text, video = text.to(device), video.to(device)

    started = time.perf_counter()
    sentence = model.text_embeddings(text)
    pooled = model.video_embeddings(video) if index is None else index.embeddings().to(device)
    coarse = sentence @ pooled.T
    stage1 = stage1_videos(model, sentence, video, coarse, topk, shortlist, top_frames, index)
    videos_of_text = stage1.candidates
    texts_of_video = top_candidates(coarse.T, topk)
    _sync(device)
    stage1_s = time.perf_counter() - started

    started = time.perf_counter()
    with one_cpu_thread(device):
        t2v = stage1.merged(rescore_videos(model, text, video, videos_of_text))
        v2t = merge_reranked(coarse.T, texts_of_video, rescore_texts(model, text, video, texts_of_video))
    _sync(device)
    stage2 = time.perf_counter() - started
    rescored = torch.zeros_like(coarse, dtype=torch.bool).scatter_(1, videos_of_text, True)
    return Retrieval(t2v, v2t, {"stage1_s": stage1_s, "stage2_s": stage2}, rescored, stage1.ranking())
