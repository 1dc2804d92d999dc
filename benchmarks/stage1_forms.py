"""Which stage-1 form ranks like the full score? A trained model's stage-1 embeddings scored several ways against its
own full score, on the unseen clips of `benchmarks/retrieval_speed.py` (same generation, same feature cache).

    python benchmarks/stage1_forms.py --model models:/hvd/N --clips 2000 [--queries 1000] [--cache DIR] [key=value ...]

Stage 1 is today one vector per video: the mean frame through the first stage's video map (`RetrievalModel.
video_embeddings`). HVD's full score starts from the frames most like the caption (FFSM), so a mean over every
frame dilutes a short event with the clutter around it. The frame forms apply the same maps to each frame (the
map is linear, so their mean is today's vector before normalising) and pool the caption's cosines over the
frames: the best frame, the mean of the best m. A frame form is what a frame-level index (one vector a frame,
T per video) would search. Reported per form: `hvd.eval.metrics.stage1_metrics`, the share of captions whose
ground truth and whose full-score top-1 are inside its top k. No training; stage 1's quality is deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import torch
from retrieval_speed import real_features  # benchmarks/retrieval_speed.py
from torch import Tensor

from hvd.config import load_config
from hvd.eval.job import job_config
from hvd.eval.metrics import STAGE1_AT, stage1_metrics
from hvd.eval.retrieval import mean_of_best_frames
from hvd.model import RetrievalModel, VideoFeatures
from hvd.registry.runs import tracking_uri
from hvd.registry.sources import load_model_source

TOP_FRAMES = (1, 2, 3, 4, 6)  # 1: the best frame


def frame_forms(sentence: Tensor, frames: Tensor, frame_mask: Tensor) -> dict[str, Tensor]:
    """[Q, V] stage-1 scores from unit caption embeddings [Q, D] and unit frame embeddings [V, T, D]: the best
    frame's cosine, and the mean cosine of the best m frames (`hvd.eval.retrieval.mean_of_best_frames`)."""
    cosines = torch.einsum("qd,vtd->qvt", sentence, frames)
    return {"best frame" if m == 1 else f"mean of best {m}": mean_of_best_frames(cosines, frame_mask[None], m)
            for m in TOP_FRAMES}


def stage1_forms(model: RetrievalModel, sentence: Tensor, video: VideoFeatures) -> dict[str, Tensor]:
    """Today's stage 1 (mean frame) and the frame forms, through the model's trained first stage if it has one."""
    return {"mean frame (today)": sentence @ model.video_embeddings(video).T} | frame_forms(
        sentence, model.frame_embeddings(video), video.frame_mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a registered model URI, e.g. models:/hvd/3")
    parser.add_argument("--clips", type=int, default=2000, help="unseen clips generated, the gallery")
    parser.add_argument("--queries", type=int, default=1000, help="captions of the first clips, the queries")
    parser.add_argument("--cache", type=Path, default=Path("data/bench-retrieval"), help="retrieval_speed's cache")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. tracking.uri=sqlite:///mlflow.db")
    args = parser.parse_args()
    cli = load_config(None, args.overrides)
    mlflow.set_tracking_uri(tracking_uri(cli))
    model, trained, source = load_model_source(args.model)
    args.cache.mkdir(parents=True, exist_ok=True)
    real = real_features(model, source, job_config(cli, trained), args.clips, args.cache)
    torch.set_grad_enabled(False)
    text, truth = real.text[: args.queries], real.text_video[: args.queries]
    full = model.score(text, real.video)
    print(f"{source.uri}: {len(truth)} captions, {len(real.video)} videos, full-score t2v R@1 "
          f"{float((full.argmax(dim=1) == truth).double().mean() * 100):.1f}")
    at = " / ".join(str(k) for k in STAGE1_AT if k < len(real.video))
    print(f"| stage 1 | ground truth in top {at} | full-score top-1 in top {at} |")
    print("|---|---|---|")
    for name, coarse in stage1_forms(model, model.text_embeddings(text), real.video).items():
        found = stage1_metrics(coarse, truth, full)  # k past the gallery's size left out, as in `at`
        ks = [k for k in STAGE1_AT if f"stage1/gt_R{k}" in found]
        gt = " / ".join(f"{found[f'stage1/gt_R{k}']:.1f}" for k in ks)
        top1 = " / ".join(f"{found[f'stage1/full_top1_R{k}']:.1f}" for k in ks)
        print(f"| {name} | {gt} | {top1} |", flush=True)


if __name__ == "__main__":
    main()
