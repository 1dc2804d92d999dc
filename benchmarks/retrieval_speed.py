"""Exhaustive vs two-stage text-to-video retrieval: time per query and R@1, on growing galleries, in one run.

    python benchmarks/retrieval_speed.py --model models:/hvd@champion [--gallery 1000 10000 100000]
        [--queries 1000 1000 200] [--clips 10000] [--topk 50] [--shortlist 0 300] [--top-frames 3] [--repeats 3]
        [--threads 1] [tracking.uri=...]
    python benchmarks/retrieval_speed.py --model models:/hvd@champion --gallery 1000000 --queries 1000 \
        [--exhaustive-queries 100] [--ivf-from 100000] [--nprobe 32]

Gallery: `--clips` unseen synthetic clips (demo preset, seed 1, all in the test split, one caption
each) are generated, decoded by `prepare` and encoded by the model once; the features are cached on
disk per model version. A gallery no larger than that is the first clips, all real. A larger one (100k)
is built from the cached features: the real clips plus spliced distractors, each the first s frames
of one real clip followed by the last T - s frames of another, s uniform in 1 .. T-1, with both clips'
entities each on its own side of the cut, so every feature in the gallery is a real encoded frame or entity
and every frame is covered by an entity as in a real clip (an earlier splice that picked one entity per slot
left frames uncovered, and HVD's score of such a row was NaN). Queries: the captions of the first
`--queries` clips, each with its own clip as the ground truth.

Exhaustive: every (caption, video) pair through the full HVD score (`RetrievalModel.score`, chunked to
model.score_budget_mb). Two-stage: stage 1 is one matrix product of sentence and mean-frame embeddings
plus a top-k (with `--shortlist` n: the top n re-ranked by their frames, `eval.shortlist`, one row per n); stage 2
rescores each caption's top-k with the same full score; merged so that the top-k rank first. The gallery's side of
stage 1 (its mean-frame and frame embeddings) and what the head derives from each video alone (HVP-Net's frame and
entity weights, `Head.video_side`) are computed once before the timings, as an index holds them. Both
run on the same features in the same process, alternately `--repeats` times; per-query time = median total /
queries.

Stage 1's quality (exact stage 1, as `pipelines/evaluate.py` logs it under `stage1/`): the share of captions whose
ground truth, and whose full-score top-1, is in stage 1's top 10 / 20 / 50 / 100; on every query in memory, on
the exhaustively scored ones at scale.

Past `--in-memory-up-to` videos (a million: 17 GiB of features for the demo model) the gallery is never
held: its rows are spliced when read. Its first-stage embeddings are computed once and indexed with
FAISS as `pipelines/index.py` would (IVF from `--ivf-from` videos, `--nprobe` lists per query); stage 1
runs both exactly (a matrix product over every video) and through the index, whose recall@k against the
exact top-k is reported; stage 2 reads only the candidates' rows. Every pair is scored for the first
`--exhaustive-queries` queries only (about 4 s per query at a million videos on one core), and R@1 of
exhaustive, index two-stage and exact-stage-1 two-stage is compared on that sample. Timed once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
import ray
import torch

from hvd.config import Config, IndexConfig, SyntheticConfig, load_config
from hvd.data.prepare import prepare
from hvd.data.shards import read_shards
from hvd.data.synthetic import generate
from hvd.eval.encode import EncodedSplit, encode_split
from hvd.eval.job import job_config
from hvd.eval.metrics import STAGE1_AT, ranks_of_positives, stage1_metrics
from hvd.eval.retrieval import (
    FramesOf,
    frame_shortlist,
    merge_reranked,
    rescore_gathered,
    rescore_videos,
    stage1_videos,
    top_candidates,
)
from hvd.gallery import ann_bytes, ann_kind, build_ann, search_ann
from hvd.model import RetrievalModel, TextFeatures, VideoFeatures, build_tokenizer
from hvd.registry.runs import tracking_uri
from hvd.registry.sources import ModelSource, load_model_source

T = TypeVar("T")


def real_features(
    model: RetrievalModel, source: ModelSource, cfg: Config, clips: int, cache: Path
) -> EncodedSplit:
    """The real clips, encoded once per model version and cached: every gallery is built from them."""
    path = cache / f"features-{source.label}-{source.source_run[:8]}-{clips}.pt"
    if path.is_file():
        with torch.serialization.safe_globals([EncodedSplit, TextFeatures, VideoFeatures]):  # our dataclasses only
            return torch.load(path, weights_only=True)
    synthetic = SyntheticConfig(
        preset="demo", out=str(cache / f"clips-{clips}"), seed=1, num_train=0, num_val=0, num_test=clips
    )
    manifest = generate(synthetic, progress=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    shards = cache / f"shards-{clips}-{cfg.data.frame_size}px-{cfg.data.num_frames}f"
    print(prepare(cfg, manifest, shards), flush=True)
    ray.shutdown()
    table = read_shards(shards, "test")
    encoded = encode_split(model, table, build_tokenizer(cfg.model, cfg.data.max_words), cfg.eval.batch_size)
    torch.save(encoded, path)
    return encoded


@dataclass
class SplicedGallery:
    """The real videos (rows 0 .. n-1, the ground truths), then spliced distractors up to `size`: the first s
    frames of one real video followed by the last T - s of another. A row holds both videos' entities (2E slots),
    each kept on its own side of the cut (the frames it covers there), so every frame a head may keep is still
    covered by an entity, as in a real video; a real video is its E entities and E empty slots. Where the entities
    are `blocks` segments (HVP-Net's ViT blocks, `Head.vision_layers`), both videos' segments sit side by side
    block by block. Rows are built when read, so a million-video gallery costs only the rows a step touches."""

    real: VideoFeatures
    first: torch.Tensor  # [distractors] the real video each distractor starts as
    second: torch.Tensor  # [distractors] the real video it ends as
    cut: torch.Tensor  # [distractors] frames taken from the first
    blocks: int = 1  # segments of the entities, one per ViT block a head reads

    @classmethod
    def of_size(cls, real: VideoFeatures, size: int, seed: int = 0, blocks: int = 1) -> SplicedGallery:
        generator = torch.Generator().manual_seed(seed)
        count, frames = max(size - len(real), 0), real.frames.shape[1]
        first = torch.randint(len(real), (count,), generator=generator)
        second = (first + torch.randint(1, len(real), (count,), generator=generator)) % len(real)  # another video
        cut = torch.randint(1, frames, (count,), generator=generator)
        return cls(real[: min(size, len(real))], first, second, cut, blocks)

    def __len__(self) -> int:
        return len(self.real) + len(self.first)

    def sources(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's first and second real video, and which of its frames come from the first [n, T]; a real
        video is one spliced with itself at T."""
        rows, frames = rows.cpu(), self.real.frames.shape[1]
        if not len(self.first):
            return rows, rows, torch.ones(len(rows), frames, dtype=torch.bool)
        is_real = rows < len(self.real)
        spliced = (rows - len(self.real)).clamp(min=0, max=len(self.first) - 1)
        a, b = torch.where(is_real, rows, self.first[spliced]), torch.where(is_real, rows, self.second[spliced])
        s = torch.where(is_real, frames, self.cut[spliced])
        return a, b, torch.arange(frames) < s[:, None]

    def frames_of(self, real_frames: torch.Tensor) -> FramesOf:
        """Rows' frame embeddings spliced as their frames are, from the real videos' `real_frames` [n, T, D]: what a
        frame index of this gallery would store."""
        def frames_of(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a, b, from_first = self.sources(rows)
            mask = torch.where(from_first, self.real.frame_mask[a], self.real.frame_mask[b])
            return torch.where(from_first[..., None], real_frames[a], real_frames[b]), mask

        return frames_of

    def rows(self, rows: torch.Tensor) -> VideoFeatures:
        """The features of gallery rows, in the order given."""
        real = self.real
        if not len(self.first):  # only real videos: as encoded
            return real[rows.cpu()]
        a, b, from_first = self.sources(rows)
        return VideoFeatures(
            frames=torch.where(from_first[..., None], real.frames[a], real.frames[b]),
            frame_mask=torch.where(from_first, real.frame_mask[a], real.frame_mask[b]),
            patches=self._side_by_side(real.patches[a], real.patches[b]),
            patch_frames=self._side_by_side(real.patch_frames[a] & from_first[:, None],
                                            real.patch_frames[b] & ~from_first[:, None]),
            frame_views=torch.where(from_first[:, None, :, None], real.frame_views[a], real.frame_views[b]),
        )

    def _side_by_side(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """[n, 2E, ...] from two [n, E, ...] entity tensors: each block's segment of the first, then the second's."""
        pairs = zip(first.chunk(self.blocks, dim=1), second.chunk(self.blocks, dim=1), strict=True)
        return torch.cat([part for pair in pairs for part in pair], dim=1)

    def chunks(self, size: int) -> Iterator[VideoFeatures]:
        for start in range(0, len(self), size):
            yield self.rows(torch.arange(start, min(start + size, len(self))))

    def materialize(self, chunk: int = 10_000) -> VideoFeatures:
        return VideoFeatures.cat(list(self.chunks(chunk)))


def time_exhaustive(
    model: RetrievalModel, text: TextFeatures, video: VideoFeatures
) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    scores = model.score(text, video)
    return time.perf_counter() - started, scores


def time_two_stage(
    model: RetrievalModel, text: TextFeatures, video: VideoFeatures, pooled: torch.Tensor, frames: torch.Tensor,
    topk: int, shortlist: int, top_frames: int,
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Stage 1's and stage 2's seconds, the merged ranking scores, and stage 1's ranking scores. The gallery's
    side of stage 1 (`pooled`, `frames`) is given: an index holds it before any caption comes."""
    started = time.perf_counter()
    sentence = model.text_embeddings(text)
    stage1 = stage1_videos(model, sentence, video, sentence @ pooled.T, topk, shortlist, top_frames, frames=frames)
    stage1_s = time.perf_counter() - started
    started = time.perf_counter()
    merged = stage1.merged(rescore_videos(model, text, video, stage1.candidates))
    stage2_s = time.perf_counter() - started
    return stage1_s, stage2_s, merged, stage1.ranking()


def t2v_ranks(scores: torch.Tensor, text_video: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank of each caption's video; distractors have no captions, so no v2t here."""
    positive = torch.zeros(scores.shape, dtype=torch.bool)
    positive[torch.arange(len(text_video)), text_video] = True
    return ranks_of_positives(scores, positive)


def recall(ranks: torch.Tensor, k: int) -> float:
    return float((ranks <= k).double().mean() * 100)


def measure_in_memory(
    model: RetrievalModel,
    text: TextFeatures,
    truth: torch.Tensor,
    video: VideoFeatures,
    topk: int,
    repeats: int,
    shortlists: tuple[int, ...] = (0,),
    top_frames: int = 3,
) -> list[dict[str, float]]:
    """Exhaustive against two-stage (exact stage 1; one row per frame shortlist, 0: none) on every query, all
    alternately `repeats` times, so a load swing on this shared machine hits each; each one's median. What an
    index holds is computed before the clock, for both: the gallery's side of stage 1 and what the head derives
    from each video alone (`RetrievalModel.video_side`)."""
    exhaustive_runs, staged_runs = [], {shortlist: [] for shortlist in shortlists}
    video = model.video_side(video)
    pooled, frames = model.video_embeddings(video), model.frame_embeddings(video)
    for _ in range(repeats):
        exhaustive_s, scores = time_exhaustive(model, text, video)
        exhaustive_runs.append(exhaustive_s)
        for shortlist in shortlists:
            stage1_s, stage2_s, merged, ranking = time_two_stage(model, text, video, pooled, frames, topk, shortlist,
                                                                     top_frames)
            staged_runs[shortlist].append((stage1_s + stage2_s, stage1_s, stage2_s, merged, ranking))
    exhaustive_s = statistics.median(exhaustive_runs)
    exhaustive_ranks, queries = t2v_ranks(scores, truth), len(truth)
    rows = []
    for shortlist, runs in staged_runs.items():
        _, stage1_s, stage2_s, merged, ranking = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        two_stage_ranks = t2v_ranks(merged, truth)
        row = {
            "gallery": len(video),
            "queries": queries,
            "shortlist": shortlist if shortlist > topk else 0,
            "top_frames": top_frames,
            "exhaustive_ms": exhaustive_s / queries * 1e3,
            "stage1_ms": stage1_s / queries * 1e3,
            "stage2_ms": stage2_s / queries * 1e3,
            "two_stage_ms": (stage1_s + stage2_s) / queries * 1e3,
            "speedup": exhaustive_s / (stage1_s + stage2_s),
            "exhaustive_R1": recall(exhaustive_ranks, 1),
            "two_stage_R1": recall(two_stage_ranks, 1),
            "exhaustive_recall_at_k": recall(exhaustive_ranks, topk),
            "two_stage_recall_at_k": recall(two_stage_ranks, topk),  # stage 1's recall: stage 2 reorders
        }
        row["R1_difference"] = row["two_stage_R1"] - row["exhaustive_R1"]
        rows.append(row | stage1_metrics(ranking, truth, scores))
    return rows


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def exact_candidates(sentence: torch.Tensor, embeddings: torch.Tensor, topk: int, block: int = 100) -> torch.Tensor:
    """Exact stage 1 over the whole gallery, `block` queries at a time (a [block, N] score matrix each)."""
    return torch.cat([top_candidates(sentence[i : i + block] @ embeddings.T, topk) for i in range(0, len(sentence), block)])


def ann_recall_at_k(sentence: torch.Tensor, embeddings: torch.Tensor, found: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Share of the index's k candidates that score at least as well as the exact k-th best: recall@k of
    the exact top-k where tied videos count alike (spliced distractors can share an embedding)."""
    def scores(rows: torch.Tensor) -> torch.Tensor:
        return torch.einsum("qd,qkd->qk", sentence, embeddings[rows])

    kth_best = scores(exact[:, -1:])
    return (scores(found) >= kth_best - 1e-5).double().mean()


def rerank(model: RetrievalModel, text: TextFeatures, gallery: SplicedGallery, candidates: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Stage 2 (reading only the candidates' rows): its time, and each query's candidates best first."""
    seconds, fine = timed(lambda: rescore_gathered(model, text, gallery.rows, candidates))
    return seconds, candidates.gather(1, fine.argsort(dim=1, descending=True, stable=True))


def recall_in(ranked: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """R@k of a two-stage ranking: the ground truth among the first k of the reranked candidates."""
    return float((ranked[:, :k] == truth[:, None]).any(dim=1).double().mean() * 100)


def measure_at_scale(
    model: RetrievalModel, text: TextFeatures, truth: torch.Tensor, gallery: SplicedGallery, topk: int,
    index_cfg: IndexConfig, exhaustive_queries: int, chunk: int = 20_000, shortlist: int = 0, top_frames: int = 3,
) -> dict[str, float]:
    """A gallery too large for every pair (and for holding its features): first-stage embeddings and an
    index built once; exact and ANN stage 1 and stage 2 timed on every query; exhaustive scoring only on the
    first `exhaustive_queries` queries, whose R@1 all modes are compared on. `shortlist` > topk: both stage 1s
    search that many and re-rank them by their frame embeddings (`eval.shortlist`; a frame index, float16, as
    `pipelines/index.py` stores it: the real videos' computed once and spliced), timed with the index's search."""
    queries, size = len(truth), len(gallery)
    shortlist = shortlist if shortlist > topk else 0
    embed_s, embeddings = timed(lambda: torch.cat([model.video_embeddings(v) for v in gallery.chunks(chunk)]))
    build_s, ann = timed(lambda: build_ann(embeddings.numpy(), index_cfg))
    sentence = model.text_embeddings(text)
    wanted = max(topk, shortlist)
    exact_s, exact = timed(lambda: exact_candidates(sentence, embeddings, wanted))
    ann_s, (_, found) = timed(lambda: search_ann(ann, sentence, wanted, index_cfg.nprobe))
    found = torch.where(found < 0, exact, found)  # an IVF search that came back short: never on these runs
    ann_recall = float(ann_recall_at_k(sentence, embeddings, found, exact))
    exact_ranking = sentence[: min(exhaustive_queries, queries)] @ embeddings.T  # stage 1's, for the sampled queries
    frames_s = 0.0
    if shortlist:  # a frame index: the real videos' frame embeddings computed once, spliced as their rows are
        frames_of = gallery.frames_of(model.frame_embeddings(gallery.real).half())
        frames_s, (_, best) = timed(lambda: frame_shortlist(sentence, frames_of, found, topk, top_frames))
        found = found.gather(1, best)
        framed, best = frame_shortlist(sentence, frames_of, exact, topk, top_frames)
        exact_ranking = merge_reranked(exact_ranking, exact[: len(exact_ranking)], framed[: len(exact_ranking)])
        exact = exact.gather(1, best)
    stage2_s, ann_ranked = rerank(model, text, gallery, found)
    _, exact_ranked = rerank(model, text, gallery, exact)

    sample = slice(0, min(exhaustive_queries, queries))
    exhaustive_s, scores = timed(lambda: torch.cat([model.score(text[sample], v) for v in gallery.chunks(chunk)], dim=1))
    exhaustive_ranks, best = t2v_ranks(scores, truth[sample]), scores.max(dim=1).values

    def agreement(ranked: torch.Tensor) -> float:
        """Share of sampled queries whose two-stage top-1 scores as well as exhaustive scoring's best video
        (an equal score counts: spliced distractors can be copies of one another)."""
        return float((scores.gather(1, ranked[sample, :1])[:, 0] >= best - 1e-6).double().mean() * 100)

    sampled = len(exhaustive_ranks)
    row = {
        "gallery": size,
        "queries": queries,
        "exhaustive_queries": sampled,
        "shortlist": shortlist,
        "top_frames": top_frames,
        "index": ann_kind(ann),
        "ivf_lists": getattr(ann, "nlist", None),
        "nprobe": index_cfg.nprobe if ann_kind(ann) == "ivf" else None,
        "index_MiB": ann_bytes(ann) / 2**20,
        "embeddings_MiB": embeddings.numel() * embeddings.element_size() / 2**20,
        "features_GiB": size * gallery.real.row_bytes() / 2**30,  # what holding every video's features would take
        "embed_s": embed_s,
        "build_s": build_s,
        "exhaustive_ms": exhaustive_s / sampled * 1e3,
        "exact_stage1_ms": exact_s / queries * 1e3,
        "ann_stage1_ms": (ann_s + frames_s) / queries * 1e3,
        "frames_ms": frames_s / queries * 1e3,
        "stage2_ms": stage2_s / queries * 1e3,
        "two_stage_ms": (ann_s + frames_s + stage2_s) / queries * 1e3,
        "speedup": (exhaustive_s / sampled) / ((ann_s + frames_s + stage2_s) / queries),
        "ann_recall_at_k": ann_recall * 100,  # of the exact stage 1's top max(k, shortlist)
        # on the sampled queries: how often two-stage returns exhaustive scoring's best video, and R@K of each
        "top1_agreement": agreement(ann_ranked),
        "exact_top1_agreement": agreement(exact_ranked),
    }
    for k in (1, 10, topk):
        row[f"exhaustive_R{k}"] = recall(exhaustive_ranks, k)
        row[f"two_stage_R{k}_sampled"] = recall_in(ann_ranked[sample], truth[sample], k)
        row[f"exact_two_stage_R{k}_sampled"] = recall_in(exact_ranked[sample], truth[sample], k)
        row[f"two_stage_R{k}"] = recall_in(ann_ranked, truth, k)
        row[f"exact_two_stage_R{k}"] = recall_in(exact_ranked, truth, k)
    return row | stage1_metrics(exact_ranking, truth[sample], scores)  # exact stage 1, sampled queries


def print_in_memory(rows: list[dict[str, float]], topk: int) -> None:
    print(
        "| gallery | queries | stage 1 | exhaustive ms/query | stage 1 ms/query | stage 2 ms/query | two-stage ms/query "
        f"| speed-up | exhaustive R@1 | two-stage R@1 | difference | exhaustive R@{topk} "
        f"| two-stage R@{topk} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['gallery']:,} | {r['queries']:,} | {stage1_name(r)} | {r['exhaustive_ms']:.2f} | {r['stage1_ms']:.3f} | "
            f"{r['stage2_ms']:.2f} | {r['two_stage_ms']:.2f} | {r['speedup']:.1f}x | {r['exhaustive_R1']:.1f} | "
            f"{r['two_stage_R1']:.1f} | {r['R1_difference']:+.1f} | {r['exhaustive_recall_at_k']:.1f} | "
            f"{r['two_stage_recall_at_k']:.1f} |"
        )


def stage1_name(row: dict[str, float]) -> str:
    shortlist = row.get("shortlist", 0)
    return f"frames of top {shortlist:,} (best {row['top_frames']})" if shortlist else "mean frame"


def print_stage1(rows: list[dict[str, float]]) -> None:
    """Stage 1's quality (exact, the matrix product): at scale on the exhaustively scored queries only."""
    ks = [k for k in STAGE1_AT if f"stage1/gt_R{k}" in rows[0]]
    at = "/".join(str(k) for k in ks)
    print(f"\n| gallery | queries | stage 1 | its top {at} hold the ground truth | ... hold the full score's top-1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        queries = r.get("exhaustive_queries", r["queries"])
        truth = " / ".join(f"{r.get(f'stage1/gt_R{k}', float('nan')):.1f}" for k in ks)
        top1 = " / ".join(f"{r.get(f'stage1/full_top1_R{k}', float('nan')):.1f}" for k in ks)
        print(f"| {r['gallery']:,} | {queries:,} | {stage1_name(r)} | {truth}% | {top1}% |")


def print_at_scale(rows: list[dict[str, float]], topk: int) -> None:
    print(
        "\n| gallery | stage 1 | index | index MiB | build s | exhaustive ms/query | exact stage 1 ms/query "
        "| index stage 1 ms/query | stage 2 ms/query | speed-up | index recall of exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind = f"IVF{r['ivf_lists']}, nprobe {r['nprobe']}" if r["index"] == "ivf" else "flat"
        print(
            f"| {r['gallery']:,} | {stage1_name(r)} | {kind} | {r['index_MiB']:.0f} | {r['build_s']:.0f} | {r['exhaustive_ms']:.0f} "
            f"| {r['exact_stage1_ms']:.2f} | {r['ann_stage1_ms']:.3f} | {r['stage2_ms']:.2f} | {r['speedup']:.0f}x "
            f"| {r['ann_recall_at_k']:.1f} |"
        )
    print(
        "\n| gallery | sampled queries | mode | top-1 same as exhaustive | R@1 | R@10 "
        f"| R@{topk} | R@1 (all queries) | R@{topk} (all queries) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for label, prefix, agreement in (("exhaustive", "exhaustive", None), ("two-stage, index", "two_stage", "top1_agreement"),
                                         ("two-stage, exact stage 1", "exact_two_stage", "exact_top1_agreement")):
            sampled = "" if prefix == "exhaustive" else "_sampled"
            label += f", {stage1_name(r)}" if r["shortlist"] and prefix != "exhaustive" else ""
            same = "" if agreement is None else f"{r[agreement]:.0f}%"
            every = "" if prefix == "exhaustive" else f"{r[f'{prefix}_R1']:.1f} | {r[f'{prefix}_R{topk}']:.1f}"
            print(
                f"| {r['gallery']:,} | {r['exhaustive_queries']} | {label} | {same} | {r[f'{prefix}_R1{sampled}']:.1f} "
                f"| {r[f'{prefix}_R10{sampled}']:.1f} | {r[f'{prefix}_R{topk}{sampled}']:.1f} | {every or ' | '} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, ..."
    )
    parser.add_argument("--gallery", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument(
        "--queries", type=int, nargs="+", default=[1000, 1000, 200], help="captions per gallery size"
    )
    parser.add_argument("--clips", type=int, default=10000, help="real clips generated, decoded and encoded")
    parser.add_argument("--topk", type=int, default=50)
    parser.add_argument(
        "--shortlist", type=int, nargs="+", default=[0],
        help="stage 1 re-ranks its top this many by their frames before stage 2 (eval.shortlist); in memory, several: "
        "one row each, in the same run; at scale: the largest; 0: the mean frame only",
    )
    parser.add_argument("--top-frames", type=int, default=3, help="eval.top_frames for --shortlist")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per mode and size; the median is kept"
    )
    parser.add_argument("--cache", type=Path, default=Path("data/bench-retrieval"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for scoring (1: steady on a "
        "shared machine, where idle-waiting threads make every small op slow)",
    )
    parser.add_argument(
        "--in-memory-up-to", type=int, default=100_000,
        help="galleries up to this size are held in memory and scored exhaustively on every query; larger ones "
        "are built row by row, searched through an index, and scored exhaustively on --exhaustive-queries only",
    )
    parser.add_argument("--exhaustive-queries", type=int, default=100, help="large galleries: queries scored exhaustively")
    parser.add_argument("--ivf-from", type=int, default=IndexConfig.ivf_from, help="index.ivf_from for large galleries")
    parser.add_argument("--nprobe", type=int, default=IndexConfig.nprobe, help="index.nprobe for large galleries")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. tracking.uri=sqlite:///mlflow.db"
    )
    args = parser.parse_args()
    if len(args.queries) != len(args.gallery):
        parser.error("--queries needs one count per --gallery size")

    cli = load_config(None, args.overrides)
    mlflow.set_tracking_uri(tracking_uri(cli))
    model, trained, source = load_model_source(args.model)
    cfg = job_config(cli, trained)
    args.cache.mkdir(parents=True, exist_ok=True)
    real = real_features(model, source, cfg, args.clips, args.cache)
    if not torch.equal(real.text_video, torch.arange(len(real.video_ids))):
        raise ValueError("the benchmark expects one caption per real clip")

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    index_cfg = IndexConfig(ivf_from=args.ivf_from, nprobe=args.nprobe)
    in_memory, at_scale = [], []
    for size, queries in zip(args.gallery, args.queries, strict=True):
        gallery = SplicedGallery.of_size(real.video, size, blocks=max(1, len(model.head.vision_layers)))
        text, truth = real.text[:queries], real.text_video[:queries]
        if size <= args.in_memory_up_to:
            rows = measure_in_memory(model, text, truth, gallery.materialize(), args.topk, args.repeats,
                                     tuple(args.shortlist), args.top_frames)
            in_memory += rows
        else:
            row = measure_at_scale(model, text, truth, gallery, args.topk, index_cfg, args.exhaustive_queries,
                                   shortlist=max(args.shortlist), top_frames=args.top_frames)
            at_scale.append(row)
            rows = [row]
        for row in rows:
            print(json.dumps(row), flush=True)

    print(
        f"\nmodel {source.uri} ({source.name} version {source.version}), top-{args.topk}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    )
    if in_memory:
        print_in_memory(in_memory, args.topk)
    if at_scale:
        print_at_scale(at_scale, args.topk)
    print_stage1(in_memory + at_scale)
    if args.json:
        settings = {
            "model": source.uri,
            "version": source.version,
            "topk": args.topk,
            "shortlist": args.shortlist,
            "top_frames": args.top_frames,
            "repeats": args.repeats,
            "threads": args.threads,
            "ivf_from": args.ivf_from,
            "nprobe": args.nprobe,
        }
        args.json.write_text(json.dumps({**settings, "rows": in_memory + at_scale}, indent=2) + "\n")


if __name__ == "__main__":
    main()
