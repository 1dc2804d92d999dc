"""Retrieval metrics in CLIP4Clip's and X-Pool's conventions, so numbers compare with published tables.

- t2v: one query per caption, ranking every video.
- v2t: one query per video, ranking caption *groups* (each video's captions), a group scoring the max
  over its captions (CLIP4Clip's `tensor_video_to_text_sim`); with one caption per video this is sim.T.
- R@K in percent; MdR is `np.median` of the 1-based ranks (the mean of the two middle ranks for an even
  query count); MnR their mean.
- Ties are pessimistic: a negative that ties the ground truth ranks above it, so a model that scores
  everything equal gets the worst rank, never the best (CLIP4Clip's sort-based ranks are optimistic there).
- Non-finite scores are refused (`NonFiniteScores`): `sim >= NaN` is false, so a NaN model would otherwise
  rank every positive first and read as perfect retrieval.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hvd.errors import HvdError

RECALL_AT = (1, 5, 10)
CONVENTIONS = (
    "CLIP4Clip/X-Pool: t2v one query per caption; v2t one query per video over caption groups scored by "
    "their best caption; MdR np.median and MnR mean of 1-based ranks; ties pessimistic"
)


class NonFiniteScores(HvdError, ValueError):
    """A score matrix holding NaN or infinity: the model is broken, and no metric of it means anything."""


def check_finite(scores: Tensor, what: str) -> None:
    """Refuse a score matrix with any NaN or infinite entry, saying how many of each."""
    finite = torch.isfinite(scores)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(scores).sum())
    raise NonFiniteScores(
        f"{what} scores are not finite ({nan} NaN, {int((~finite).sum()) - nan} infinite of {scores.numel()}): "
        "the model's weights or outputs are broken (e.g. NaN weights from a diverged step); nothing is reported"
    )


def ranks_of_positives(sim: Tensor, positive: Tensor) -> Tensor:
    """Rank (1 = best) of each query's best-scoring positive among all candidates.

    sim: [queries, candidates]; positive: same-shape bool mask of the ground-truth pairs.
    """
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every query needs at least one ground-truth candidate")
    best_positive = sim.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    beats_or_ties = (sim >= best_positive) & ~positive
    return beats_or_ties.sum(dim=1) + 1


def summarise(ranks: Tensor, prefix: str) -> dict[str, float]:
    ranks = ranks.double()
    metrics = {f"{prefix}R{k}": float((ranks <= k).double().mean() * 100) for k in RECALL_AT}
    metrics[f"{prefix}MdR"] = float(ranks.quantile(0.5))  # np.median: the two middle ranks' mean when even
    metrics[f"{prefix}MnR"] = float(ranks.mean())
    return metrics


def dual_softmax(sim: Tensor, temperature: float = 100.0) -> Tensor:
    """Dual-softmax re-normalisation (CLIP4Clip's DSL): each score weighted by a softmax over the queries."""
    return sim * torch.softmax(sim * temperature, dim=0)


def query_ranks(sim: Tensor, text_video: Tensor, v2t_sim: Tensor | None = None) -> dict[str, Tensor]:
    """Rank of the ground truth per query: "t2v" one per caption, "v2t" one per video (over caption groups).

    `v2t_sim` [videos, texts] ranks the video queries when they were scored apart from `sim` (two-stage
    retrieval reranks each direction on its own); by default v2t reads `sim.T`.
    """
    sim, text_video = sim.float().cpu(), text_video.long().cpu()
    v2t = sim.T if v2t_sim is None else v2t_sim.float().cpu()
    check_finite(sim, "text-to-video")
    check_finite(v2t, "video-to-text")
    positive = torch.zeros(sim.shape, dtype=torch.bool)
    positive[torch.arange(len(text_video)), text_video] = True
    videos = sim.shape[1]
    if bool((torch.bincount(text_video, minlength=videos) == 0).any()):
        raise ValueError("every video needs at least one caption: its ground truth as a v2t query")
    index = text_video.expand(videos, -1)  # [videos, texts]: the group of every caption
    groups = torch.full((videos, videos), float("-inf")).scatter_reduce_(1, index, v2t, "amax")
    return {
        "t2v": ranks_of_positives(sim, positive),
        "v2t": ranks_of_positives(groups, torch.eye(videos, dtype=torch.bool)),
    }


def retrieval_metrics(
    sim: Tensor, text_video: Tensor, dsl: bool = False, v2t_sim: Tensor | None = None
) -> dict[str, float]:
    """Text-to-video and video-to-text metrics of a [texts, videos] score matrix.

    `text_video[i]` is the video that caption i describes; a video may have several captions (see the
    module docstring for how each direction ranks them). With `dsl`,
    the dual-softmax numbers are added under `dsl_`-prefixed names, never replacing the plain ones.
    `v2t_sim`: see `query_ranks`.
    """
    ranks = query_ranks(sim, text_video, v2t_sim)
    metrics = summarise(ranks["t2v"], "t2v/") | summarise(ranks["v2t"], "v2t/")
    if dsl:  # each direction re-normalised over its own queries
        v2t = sim.T if v2t_sim is None else v2t_sim
        dsl_ranks = query_ranks(dual_softmax(sim.float().cpu()), text_video, dual_softmax(v2t.float().cpu()))
        metrics |= summarise(dsl_ranks["t2v"], "t2v/dsl_") | summarise(dsl_ranks["v2t"], "v2t/dsl_")
    return metrics


STAGE1_AT = (10, 20, 50, 100)


def stage1_metrics(coarse: Tensor, text_video: Tensor, full: Tensor | None = None) -> dict[str, float]:
    """How well stage 1 (the global embeddings' dot product) serves stage 2, per caption query, in percent:
    `gt_R<k>`, the share whose ground-truth video is in stage 1's top k (stage 2 can only rank first what it is
    given), and with the full score's [texts, videos] matrix `full_top1_R<k>`, the share whose full-score top-1
    is in it (stage 1 ranking like stage 2, not only the ground truth). k past the gallery's size is left out.
    Ties pessimistic, as every rank here."""
    coarse, text_video = coarse.float().cpu(), text_video.long().cpu()
    check_finite(coarse, "stage-1")
    rows = torch.arange(len(text_video))
    truth = ranks_of_positives(coarse, torch.zeros_like(coarse, dtype=torch.bool).index_put_((rows, text_video),
                                                                                            torch.tensor(True)))
    ks = [k for k in STAGE1_AT if k < coarse.shape[1]]
    metrics = {f"stage1/gt_R{k}": float((truth <= k).double().mean() * 100) for k in ks}
    if full is not None:
        full = full.float().cpu()
        check_finite(full, "text-to-video")
        best = torch.zeros_like(full, dtype=torch.bool).scatter_(1, full.argmax(dim=1, keepdim=True), True)
        top1 = ranks_of_positives(coarse, best)
        metrics |= {f"stage1/full_top1_R{k}": float((top1 <= k).double().mean() * 100) for k in ks}
    return metrics
