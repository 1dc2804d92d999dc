"""Stage-2 reranking of one head: its grouped passes (`RetrievalModel.score_groups`) against one `score` call per
query (the path of a head without a grouped form: HCMI's before it had one), same features, one process.

    python benchmarks/rerank_groups.py [--head hcmi] [--preset tiny] [--queries 200] [--topk 50] [--frames 12]
        [--repeats 5]

`--queries` captions and as many videos, random unit features of the shapes the model encodes into (as
`model_cost.py` makes them); each caption's `--topk` candidate videos and each video's `--topk` candidate
captions drawn at random. Stage 2 runs on one CPU thread, as the evaluation job runs it; the two paths take
turns (ABBA) so that load from other processes hits both alike. Prints one JSON object: median and minimum
wall and CPU seconds of each path per direction, one-by-one over grouped, and the largest score difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable

import torch
from model_cost import encoded_features, take_turns

from hvd.config import CHOICES, ModelConfig
from hvd.eval.retrieval import one_cpu_thread, rescore_texts, rescore_videos, top_candidates
from hvd.model import RetrievalModel, TextFeatures, VideoFeatures, build_model

Rescore = Callable[[RetrievalModel, TextFeatures, VideoFeatures, torch.Tensor], torch.Tensor]


def rerank(model: RetrievalModel, rescore: Rescore, grouped: bool, text: TextFeatures, video: VideoFeatures,
           candidates: torch.Tensor) -> torch.Tensor:
    """One direction of stage 2, through the head's grouped form or (`grouped` False) one `score` call per query."""
    model.head.scores_groups = grouped  # the switch `rescore_videos` and `rescore_texts` read
    with torch.no_grad(), one_cpu_thread(model.device):
        return rescore(model, text, video, candidates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="hcmi", choices=CHOICES["model.head"])
    parser.add_argument("--preset", default="tiny", choices=CHOICES["model.preset"])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--topk", type=int, default=50)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=args.preset, head=args.head)).eval()
    if not model.head.scores_groups:
        parser.error(f"{args.head} has no grouped form to compare")
    text, video = encoded_features(model, args.queries, args.frames)
    generator = torch.Generator().manual_seed(1)
    candidates = {
        "t2v": (rescore_videos, top_candidates(torch.rand(len(text), len(video), generator=generator), args.topk)),
        "v2t": (rescore_texts, top_candidates(torch.rand(len(video), len(text), generator=generator), args.topk)),
    }
    runs = {
        f"{direction}_{path}": lambda rescore=rescore, rows=rows, grouped=path == "grouped": rerank(
            model, rescore, grouped, text, video, rows)
        for direction, (rescore, rows) in candidates.items() for path in ("grouped", "one_by_one")
    }
    results: dict[str, object] = {
        "head": args.head, "preset": args.preset, "queries": args.queries, "topk": args.topk, "frames": args.frames,
        "load_average_1min_before": os.getloadavg()[0],
    }
    turns = take_turns(runs, args.repeats)
    for clock in ("wall", "cpu"):
        for name, summary in (("median", statistics.median), ("min", min)):
            seconds = {run: summary(clocks[clock]) for run, clocks in turns.items()}
            results[f"{clock}_{name}_s"] = {run: round(s, 4) for run, s in seconds.items()}
            results[f"{clock}_{name}_one_by_one_over_grouped"] = {
                direction: round(seconds[f"{direction}_one_by_one"] / seconds[f"{direction}_grouped"], 2)
                for direction in candidates
            }
    results["max_abs_score_difference"] = {
        direction: float((runs[f"{direction}_grouped"]() - runs[f"{direction}_one_by_one"]()).abs().max())
        for direction in candidates
    }
    results["load_average_1min_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
