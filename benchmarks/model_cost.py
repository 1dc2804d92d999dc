"""Cost of every head (HVD with PFCM per frame and per video, X-Pool, EERCF, HVP-Net, HCMI) against the meanP
baseline on one model preset, measured in one run.

    python benchmarks/model_cost.py [--preset tiny] [--batch 32] [--frames 12] [--pairs 1000] [--repeats 15]

1. Training step (encode captions and frames, loss, backward, AdamW step) of `hvd` (`model.hvd.pfcm_scope=frame`),
   `hvd_video` (`video`), `hvd_pair` (`pair`, the paper's order: PFCM per caption-video pair), `xpool`, `eercf`, `hvp`, `hcmi` and `meanp` on the same batch, interleaved
   so that load from other processes hits all alike: median and minimum wall and CPU seconds each and their
   ratios over meanp (target for hvd: at most 1.5).
2. Pairwise scoring of `--pairs` captions x `--pairs` videos from encoded features, with each variant (hvd_pair:
   a tenth of each, times 100), and
   two-stage retrieval (both directions, `eval.topk` candidates) on the same features: the speed-up of
   two-stage over exhaustive scoring per head.
3. DPC-KNN seconds per 1,000 tokens, laid out as the model uses it (one set of patches per frame of the
   training batch) and as one set of 1,000 tokens; and its time against a reference written the way
   HBI's `cluster_dpc_knn` computes it, with whether both give the same clusters (target: ratio <= 1.0).
4. For scale: one forward pass of PFCM run per (caption, video) pair of the training batch on the kept
   frames jointly, the alternative to the once-per-video compression the model does.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hvd.config import CHOICES, EvalConfig, HVDHeadConfig, ModelConfig, TrainConfig
from hvd.eval.retrieval import two_stage
from hvd.model import RetrievalModel, TextFeatures, VideoFeatures, build_model
from hvd.model.clustering import dpc_knn, keep_count
from hvd.train.optim import build_optimizer


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: allocator, oneDNN kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def take_turns(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU (this process, all threads) seconds of every run, `repeats` times each after a warm-up,
    taking turns in alternating order (ABBA) so that load from other processes hits all alike."""
    times = {name: {"wall": [], "cpu": []} for name in runs}
    for run in runs.values():
        run()  # warm-up: allocator, oneDNN kernels
    for repeat in range(repeats):
        for name in list(runs)[:: 1 if repeat % 2 == 0 else -1]:
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def reference_dpc_knn(x: torch.Tensor, clusters: int, k: int) -> torch.Tensor:
    """DPC-KNN written the way HBI's and HVP-Net's `cluster_dpc_knn` compute it (no padding, no tie rule,
    no noise), the speed to match: the centre token that every token joins [B, N]."""
    batch, n, channels = x.shape
    dist = torch.cdist(x, x) / channels**0.5
    density = (-(dist.topk(k, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    denser = density[:, None, :] > density[:, :, None]
    largest = dist.flatten(1).amax(dim=-1)[:, None, None]
    delta = torch.where(denser, dist, largest).amin(dim=-1)
    centres = (delta * density).topk(clusters, dim=-1).indices
    assignment = dist.gather(1, centres[:, :, None].expand(batch, clusters, n)).argmin(dim=1)
    assignment = assignment.scatter(1, centres, torch.arange(clusters).expand(batch, clusters))
    return centres.gather(1, assignment)


def dpc_against_reference(shape: tuple[int, int, int], ratio: float, k: int, repeats: int) -> dict[str, object]:
    """Seconds of `dpc_knn` and of the reference on the same random tokens, taking turns (ABBA) so that load
    from other processes hits both alike; the ratio of their medians and of their minima; and whether every
    token joins the same centre (cluster numbers may differ where two centres' scores tie in float32)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    clusters = keep_count(shape[1], ratio)
    runs = {"ours": lambda: dpc_knn(x, ratio, k), "reference": lambda: reference_dpc_knn(x, clusters, k)}
    times = {name: clocks["wall"] for name, clocks in take_turns(runs, repeats).items()}
    ours, reference = (statistics.median(times[name]) for name in runs)
    ours_clusters = dpc_knn(x, ratio, k)
    same = torch.equal(ours_clusters.centres.gather(1, ours_clusters.assignment), reference_dpc_knn(x, clusters, k))
    return {"ours_s": round(ours, 5), "reference_s": round(reference, 5), "ratio": round(ours / reference, 3),
            "ratio_of_minima": round(min(times["ours"]) / min(times["reference"]), 3),
            "identical_assignments": same}


def training_steps(
    models: dict[str, RetrievalModel], configs: dict[str, ModelConfig], batch: int, frames: int, repeats: int
) -> dict[str, list[float]]:
    """Wall and CPU (this process, all threads) seconds of every step per head, as `{head}_{clock}`.

    The heads take turns step by step, in alternating order (ABBA). CPU time is the steadier measure
    on a machine shared with other jobs: their load stretches wall time far more than it does CPU time.
    """
    any_model = next(iter(models.values()))
    size, context = any_model.image_size, any_model.backbone.context_length
    tokens = torch.randint(1, 49406, (batch, context))
    tokens[:, 0], tokens[:, 12], tokens[:, 13:] = 49406, 49407, 0  # start, 11 words, end, padding
    clips = torch.randn(batch, frames, 3, size, size)
    optimizers = {head: build_optimizer(m, TrainConfig(), configs[head]) for head, m in models.items()}

    def step(head: str) -> None:
        model, optimizer = models[head], optimizers[head]
        loss, _ = model.loss(model.encode_text(tokens), model.encode_video(clips))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    turns = take_turns({head: lambda head=head: step(head) for head in models}, repeats)
    return {f"{head}_{clock}": seconds for head, clocks in turns.items() for clock, seconds in clocks.items()}


def encoded_features(model: RetrievalModel, count: int, frames: int) -> tuple[TextFeatures, VideoFeatures]:
    """Unit features of the shapes `model` encodes `count` captions and videos into (scoring cost depends on shape only)."""
    generator = torch.Generator().manual_seed(0)
    dim, context = model.backbone.embed_dim, model.backbone.context_length
    with torch.no_grad():
        probe = model.encode_video(torch.randn(1, frames, 3, model.image_size, model.image_size, generator=generator))
    entities = probe.patches.shape[1]

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, dim, generator=generator), dim=-1)

    lengths = torch.randint(6, 20, (count, 1), generator=generator)
    text = TextFeatures(unit(count), unit(count, context), torch.arange(context) < lengths)
    frame_mask = torch.ones(count, frames, dtype=torch.bool)
    views = probe.frame_views.shape[1]
    return text, VideoFeatures(unit(count, frames), frame_mask, unit(count, entities),
                               probe.patch_frames.expand(count, -1, -1), unit(count, views, frames))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=CHOICES["model.preset"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument(
        "--pairs", type=int, default=1000, help="captions and videos in the scoring benchmark"
    )
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    configs = {
        "hvd": ModelConfig(preset=args.preset, head="hvd", hvd=HVDHeadConfig(pfcm_scope="frame")),
        "hvd_video": ModelConfig(preset=args.preset, head="hvd", hvd=HVDHeadConfig(pfcm_scope="video")),
        "hvd_pair": ModelConfig(preset=args.preset, head="hvd", hvd=HVDHeadConfig(pfcm_scope="pair")),
        "meanp": ModelConfig(preset=args.preset, head="meanp"),
        **{head: ModelConfig(preset=args.preset, head=head) for head in ("xpool", "eercf", "hvp", "hcmi")},
    }
    models = {name: build_model(cfg) for name, cfg in configs.items()}
    results: dict[str, object] = {
        "preset": args.preset,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": os.getloadavg()[0],
    }

    steps = training_steps(models, configs, args.batch, args.frames, args.repeats)
    for clock in ("wall", "cpu"):
        for name, summary in (("median", statistics.median), ("min", min)):
            step = {head: summary(steps[f"{head}_{clock}"]) for head in models}
            results[f"train_step_{clock}_{name}_s"] = {head: round(s, 4) for head, s in step.items()}
            results[f"train_step_{clock}_{name}_ratio_over_meanp"] = {
                head: round(step[head] / step["meanp"], 3) for head in models if head != "meanp"
            }

    scoring, staged, topk = {}, {}, EvalConfig().topk
    for head, model in models.items():
        # PFCM per pair costs about a thousand times a once-per-video score: a tenth of the captions and videos,
        # scaled by the pair count (scoring is linear in it), keeps the run in minutes
        pairs = args.pairs // 10 if head == "hvd_pair" else args.pairs
        text, video = encoded_features(model, pairs, args.frames)
        repeats = max(1, args.repeats // 5)
        scale = (args.pairs / pairs) ** 2  # exhaustive: every pair; two-stage: queries x top-k, linear
        scoring[head] = scale * median_seconds(lambda m=model, t=text, v=video: m.score(t, v), repeats)
        staged[head] = (args.pairs / pairs) * median_seconds(lambda m=model, t=text, v=video: two_stage(m, t, v, topk), repeats)
    results["score_scaled_from_a_tenth_of_the_pairs"] = ["hvd_pair"]
    results[f"score_{args.pairs}x{args.pairs}_s"] = {head: round(s, 4) for head, s in scoring.items()}
    results["score_ratio_over_meanp"] = {head: round(scoring[head] / scoring["meanp"], 1) for head in models if head != "meanp"}
    results[f"two_stage_top{topk}_s"] = {head: round(s, 4) for head, s in staged.items()}
    results["two_stage_speedup_over_exhaustive"] = {head: round(scoring[head] / staged[head], 1) for head in models}

    hvd, cfg = models["hvd"], HVDHeadConfig()
    grid, dim = hvd.backbone.clip.visual.grid_size, hvd.backbone.embed_dim
    per_frame = torch.randn(args.batch * args.frames, grid[0] * grid[1], dim)
    one_set = torch.randn(1, 1000, dim)
    dpc = {
        "per_frame_layout": median_seconds(
            lambda: dpc_knn(per_frame, cfg.pfcm_ratio, cfg.dpc_k), args.repeats
        )
        / (per_frame.numel() / dim / 1000),
        "one_set_of_1000": median_seconds(lambda: dpc_knn(one_set, cfg.pfcm_ratio, cfg.dpc_k), args.repeats),
    }
    results["dpc_knn_s_per_1000_tokens"] = {name: round(s, 5) for name, s in dpc.items()}
    results["dpc_knn_per_frame_layout"] = list(per_frame.shape)
    # HVP-Net's video-level layout (32 videos x 294 tokens x 64 channels) and the model's own at ViT-B scale
    # (384 frames x 49 patches x 512 channels), against the HBI-style reference in the same run.
    results["dpc_knn_vs_reference"] = {
        "x".join(map(str, shape)): dpc_against_reference(shape, cfg.pfcm_ratio, cfg.dpc_k, args.repeats)
        for shape in ((32, 294, 64), (384, 49, 512))
    }

    # The alternative to compressing once per video: PFCM over the kept frames of every (caption, video)
    # pair of the training batch, jointly; forward alone, without gradients.
    joint = torch.randn(args.batch**2, keep_count(args.frames, cfg.frame_keep) * grid[0] * grid[1], dim)
    with torch.no_grad():
        results["per_pair_joint_pfcm_forward_s"] = round(median_seconds(lambda: hvd.head.pfcm(joint), 3), 4)
    results["per_pair_joint_pfcm_layout"] = list(joint.shape)
    results["load_average_1min_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
