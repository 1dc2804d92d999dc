"""Which frames would each FFSM rule keep? A trained model's caption-frame cosines on a split with ground truth.

    python benchmarks/frame_rules.py --model models:/NAME/N --shards DIR [--split test] [--videos 200]
                                     [--margins 0.02,0.05,0.1,0.2] [tracking.uri=...]

For every video of the split (its first caption): the cosine of the caption with each sampled frame, event
frames against the others, and the event-frame recall, precision and frames kept under `share` 0.5 (the
paper's) and 0.25, `above_mean`, and `near_best` at each margin (`hvd.model.ffsm.keep_frames`, the code the head
runs). No training: it shows where a rule's margin should sit for a model before a study trains with it (the
`select` grid; docs/benchmarks.md). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch import Tensor

from hvd.cli import parse_args
from hvd.eval.encode import encode_split
from hvd.eval.mechanism import ground_truth_rows
from hvd.model import build_tokenizer
from hvd.model.ffsm import keep_frames
from hvd.registry.models import load_model
from hvd.registry.runs import tracking_uri


def rule_outcomes(similarity: Tensor, frame_mask: Tensor, event: Tensor, margins: list[float]) -> dict[str, dict]:
    """[V, T] cosines, valid frames, event frames -> per rule: event-frame recall (over videos with an event
    frame), precision and frames kept, means over videos."""
    rules = {"share 0.5": ("share", 0.5, 0.0), "share 0.25": ("share", 0.25, 0.0), "above_mean": ("above_mean", 0.5, 0.0),
             **{f"near_best {m:g}": ("near_best", 0.5, m) for m in margins}}
    event = event & frame_mask
    shown = event.sum(dim=1) > 0
    found = {}
    for name, (rule, keep, margin) in rules.items():
        kept = keep_frames(similarity, frame_mask, keep, rule, margin)
        hits = (kept & event).sum(dim=1).float()
        found[name] = {"recall": round((hits[shown] / event.sum(dim=1)[shown]).mean().item(), 3),
                       "precision": round((hits / kept.sum(dim=1).clamp(min=1)).mean().item(), 3),
                       "kept": round(kept.sum(dim=1).float().mean().item(), 2)}
    return found


def main() -> None:
    def add_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="a model URI, e.g. models:/hvd/3")
        parser.add_argument("--shards", required=True, help="shards whose split records the event frames")
        parser.add_argument("--split", default="test")
        parser.add_argument("--videos", type=int, default=200)
        parser.add_argument("--margins", default="0.02,0.05,0.1,0.2")

    cfg, args = parse_args(__doc__, ("tracking",), None, add_flags=add_flags)
    torch.set_num_threads(1)
    model, model_cfg = load_model(args.model, tracking_uri(cfg))
    table = ground_truth_rows(args.shards, args.split, args.videos)
    if table is None:
        raise SystemExit(f"{args.shards}/{args.split}: no rows record the event frames (a synthetic benchmark's do)")
    encoded = encode_split(model.eval(), table, build_tokenizer(model_cfg.model, model_cfg.data.max_words))
    first = [encoded.text_video.tolist().index(video) for video in range(len(table))]
    frames, mask = encoded.video.frames, encoded.video.frame_mask
    similarity = torch.einsum("vd,vtd->vt", encoded.text.sentence[first], frames)
    event = torch.zeros_like(mask)
    for video, flags in enumerate(table["event_frames"].to_pylist()):
        event[video, : len(flags)] = torch.from_numpy(np.asarray(flags, bool))
    event &= mask
    best = similarity.masked_fill(~mask, -torch.inf).amax(dim=1, keepdim=True)
    print(json.dumps({
        "model": args.model, "shards": args.shards, "split": args.split, "videos": len(table),
        "event_frames_per_video": round(event.sum(dim=1).float().mean().item(), 2),
        "cosine_event": [round(similarity[event].mean().item(), 3), round(similarity[event].std().item(), 3)],
        "cosine_other": [round(similarity[mask & ~event].mean().item(), 3), round(similarity[mask & ~event].std().item(), 3)],
        "below_best_event_median": round((best - similarity)[event].median().item(), 3),
        "below_best_other_q10": round((best - similarity)[mask & ~event].quantile(0.1).item(), 3),
        "rules": rule_outcomes(similarity, mask, event, [float(m) for m in args.margins.split(",")]),
    }, indent=2))


if __name__ == "__main__":
    main()
