"""Exhaustive vs two-stage text-to-video retrieval: time per query and R@1, on growing galleries, in one run.

    python benchmarks/retrieval_speed.py --model models:/hvd@champion [--gallery 1000 10000 100000]
        [--queries 1000 1000 200] [--clips 10000] [--topk 50] [--repeats 3] [--threads 1] [tracking.uri=...]

Gallery: `--clips` unseen synthetic clips (demo preset, seed 1, all in the test split, one caption
each) are generated, decoded by `prepare` and encoded by the model once; the features are cached on
disk per model version. A gallery no larger than that is the first clips, all real. A larger one (100k)
is built from the cached features: the real clips plus spliced distractors, each the first s frames
(with their patches) of one real clip followed by the last T - s frames of another, s uniform in
1 .. T-1, so every feature in the gallery is a real encoded frame. Queries: the captions of the first
`--queries` clips, each with its own clip as the ground truth.

Exhaustive: every (caption, video) pair through the full HVD score (`RetrievalModel.score`, chunked to
model.score_budget_mb). Two-stage: stage 1 is one matrix product of sentence and mean-frame embeddings
plus a top-k; stage 2 rescores each caption's top-k with the same full score; merged so that the top-k
rank first. Both run on the same features in the same process, alternately `--repeats` times; per-query
time = median total / queries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import mlflow
import ray
import torch

from hvd.config import Config, SyntheticConfig, load_config
from hvd.data.prepare import prepare
from hvd.data.shards import read_shards
from hvd.data.synthetic import generate
from hvd.eval.encode import EncodedSplit, encode_split
from hvd.eval.job import job_config
from hvd.eval.metrics import ranks_of_positives
from hvd.eval.retrieval import merge_reranked, rescore_videos, top_candidates
from hvd.eval.source import ModelSource, load_model_source
from hvd.model import RetrievalModel, TextFeatures, VideoFeatures, build_tokenizer
from hvd.tracking import tracking_uri


def real_features(
    model: RetrievalModel, source: ModelSource, cfg: Config, clips: int, cache: Path
) -> EncodedSplit:
    """The real clips, encoded once per model version and cached: every gallery is built from them."""
    path = cache / f"features-{source.label}-{source.source_run[:8]}-{clips}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
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


def gallery(real: VideoFeatures, size: int, seed: int = 0, chunk: int = 10_000) -> VideoFeatures:
    """The real videos first (indices 0 .. n-1, the ground truths), then spliced videos up to `size`:
    the first s frames (and the entities they start in) of one real video followed by the last T - s of another."""
    if size <= len(real):
        return real[:size]
    generator = torch.Generator().manual_seed(seed)
    count, frames = size - len(real), real.frames.shape[1]
    first = torch.randint(len(real), (count,), generator=generator)
    second = (first + torch.randint(1, len(real), (count,), generator=generator)) % len(real)  # another video
    cut = torch.randint(1, frames, (count,), generator=generator)
    parts = []
    first_frame = real.patch_frames.to(torch.uint8).argmax(dim=-1)  # [n, E] where each entity starts
    for a, b, s in zip(first.split(chunk), second.split(chunk), cut.split(chunk), strict=True):
        from_first = torch.arange(frames) < s[:, None]  # [n, T]
        entity_from_first = first_frame[a] < s[:, None]  # [n, E]
        parts.append(
            VideoFeatures(
                frames=torch.where(from_first[..., None], real.frames[a], real.frames[b]),
                frame_mask=torch.where(from_first, real.frame_mask[a], real.frame_mask[b]),
                patches=torch.where(entity_from_first[..., None], real.patches[a], real.patches[b]),
                patch_frames=torch.where(entity_from_first[..., None], real.patch_frames[a], real.patch_frames[b]),
                frame_views=torch.where(from_first[:, None, :, None], real.frame_views[a], real.frame_views[b]),
            )
        )
    return VideoFeatures.cat([real, *parts])


def time_exhaustive(
    model: RetrievalModel, text: TextFeatures, video: VideoFeatures
) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    scores = model.score(text, video)
    return time.perf_counter() - started, scores


def time_two_stage(
    model: RetrievalModel, text: TextFeatures, video: VideoFeatures, topk: int
) -> tuple[float, float, torch.Tensor]:
    started = time.perf_counter()
    sentence, pooled = model.global_embeddings(text, video)
    coarse = sentence @ pooled.T
    candidates = top_candidates(coarse, topk)
    stage1 = time.perf_counter() - started
    started = time.perf_counter()
    merged = merge_reranked(coarse, candidates, rescore_videos(model, text, video, candidates))
    stage2 = time.perf_counter() - started
    return stage1, stage2, merged


def t2v_ranks(scores: torch.Tensor, text_video: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank of each caption's video; distractors have no captions, so no v2t here."""
    positive = torch.zeros(scores.shape, dtype=torch.bool)
    positive[torch.arange(len(text_video)), text_video] = True
    return ranks_of_positives(scores, positive)


def recall(ranks: torch.Tensor, k: int) -> float:
    return float((ranks <= k).double().mean() * 100)


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

    rows = []
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    for size, queries in zip(args.gallery, args.queries, strict=True):
        video = gallery(real.video, size)
        text, truth = real.text[:queries], real.text_video[:queries]
        # Alternate the two and keep each one's median, so a load swing on this shared machine hits both.
        exhaustive_runs, two_stage_runs = [], []
        for _ in range(args.repeats):
            exhaustive_s, scores = time_exhaustive(model, text, video)
            stage1_s, stage2_s, merged = time_two_stage(model, text, video, args.topk)
            exhaustive_runs.append(exhaustive_s)
            two_stage_runs.append((stage1_s + stage2_s, stage1_s, stage2_s))
        exhaustive_s = statistics.median(exhaustive_runs)
        _, stage1_s, stage2_s = sorted(two_stage_runs)[len(two_stage_runs) // 2]
        exhaustive_ranks, two_stage_ranks = t2v_ranks(scores, truth), t2v_ranks(merged, truth)
        row = {
            "gallery": size,
            "queries": queries,
            "exhaustive_ms": exhaustive_s / queries * 1e3,
            "stage1_ms": stage1_s / queries * 1e3,
            "stage2_ms": stage2_s / queries * 1e3,
            "two_stage_ms": (stage1_s + stage2_s) / queries * 1e3,
            "speedup": exhaustive_s / (stage1_s + stage2_s),
            "exhaustive_R1": recall(exhaustive_ranks, 1),
            "two_stage_R1": recall(two_stage_ranks, 1),
            "exhaustive_recall_at_k": recall(exhaustive_ranks, args.topk),
            "two_stage_recall_at_k": recall(two_stage_ranks, args.topk),  # stage 1's recall: stage 2 reorders
        }
        row["R1_difference"] = row["two_stage_R1"] - row["exhaustive_R1"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(
        f"\nmodel {source.uri} ({source.name} version {source.version}), top-{args.topk}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| gallery | queries | exhaustive ms/query | stage 1 ms/query | stage 2 ms/query | two-stage ms/query "
        f"| speed-up | exhaustive R@1 | two-stage R@1 | difference | exhaustive R@{args.topk} "
        f"| two-stage R@{args.topk} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['gallery']:,} | {r['queries']:,} | {r['exhaustive_ms']:.2f} | {r['stage1_ms']:.3f} | "
            f"{r['stage2_ms']:.2f} | {r['two_stage_ms']:.2f} | {r['speedup']:.1f}x | {r['exhaustive_R1']:.1f} | "
            f"{r['two_stage_R1']:.1f} | {r['R1_difference']:+.1f} | {r['exhaustive_recall_at_k']:.1f} | "
            f"{r['two_stage_recall_at_k']:.1f} |"
        )
    if args.json:
        settings = {
            "model": source.uri,
            "version": source.version,
            "topk": args.topk,
            "repeats": args.repeats,
            "threads": args.threads,
        }
        args.json.write_text(json.dumps({**settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
