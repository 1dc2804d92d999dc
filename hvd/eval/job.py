"""The batch evaluation job: model URI + benchmark -> encoded split -> scores -> metrics, pictures, MLflow."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from mlflow.entities import DatasetInput

from hvd.config import Config
from hvd.data.decode import FrameSpec
from hvd.data.manifest import fingerprint, index_manifest
from hvd.data.prepare import QUARANTINE_FILE, prepare
from hvd.data.shards import ShardSummary
from hvd.eval import plots
from hvd.eval.actors import encode_with_actors
from hvd.eval.encode import EncodedSplit
from hvd.eval.explain import can_explain, explain_pairs, pick_queries
from hvd.eval.mechanism import ground_truth_rows, mechanism_line, mechanism_metrics
from hvd.eval.metrics import CONVENTIONS as METRIC_CONVENTIONS
from hvd.eval.metrics import query_ranks, retrieval_metrics, stage1_metrics
from hvd.eval.report import (
    EvalRun,
    experiment_name,
    log_eval_results,
    metric_table,
    mlflow_metric_names,
    start_eval_run,
    write_report,
)
from hvd.eval.retrieval import Retrieval, exhaustive, two_stage
from hvd.gallery import GalleryIndex
from hvd.model import RetrievalModel, build_tokenizer
from hvd.registry.index_links import matching_index
from hvd.registry.runs import (
    active_tracking_uri,
    benchmark_input,
    closing_run,
    run_url,
    source_tags,
    tracking_uri,
)
from hvd.registry.sources import ModelSource, load_model_source
from hvd.runtime.cluster import ensure_ray
from hvd.runtime.paths import require_shared_paths, resolve_path
from hvd.runtime.stopping import stop_on_signals

logger = logging.getLogger(__name__)

# How the model saw its training clips: evaluation samples and tokenizes the benchmark the same way.
MODEL_DATA_KEYS = ("num_frames", "sample_mode", "frame_size", "frame_codec", "jpeg_quality", "max_words")


@dataclass
class EvalOutcome:
    run_id: str
    tracking_uri: str
    run_url: str
    benchmark: str
    source: ModelSource
    metrics: dict[str, float]
    excluded: list[dict[str, str]]  # videos of the split that could not be decoded, with the reason
    out: Path
    artifacts: list[Path]


def job_config(cli: Config, trained: Config) -> Config:
    """The trained model's `model` section and frame sampling; everything else from the command line."""
    data = replace(cli.data, **{key: getattr(trained.data, key) for key in MODEL_DATA_KEYS})
    return replace(cli, model=trained.model, data=data)


def benchmark_name(cfg: Config, manifest: Path | None, shards: Path | None) -> str:
    """`eval.benchmark`, else the manifest's folder name (for --shards: the manifest they were made from)."""
    if cfg.eval.benchmark:
        return cfg.eval.benchmark
    if manifest is None:
        recorded = ShardSummary.read(shards).manifest
        if not recorded:
            return shards.resolve().name
        manifest = Path(recorded)
    return manifest.resolve().parent.name


def cached_shards(cfg: Config, manifest: Path, benchmark: str) -> Path:
    """Where the `eval.cache` keeps the split a (manifest contents, frame settings) pair decodes to."""
    identity = json.dumps(
        [fingerprint(manifest), FrameSpec.from_config(cfg.data).to_dict(), cfg.eval.split], sort_keys=True
    )
    return Path(cfg.eval.cache) / f"{benchmark}-{cfg.eval.split}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def prepared_shards(cfg: Config, manifest: Path, benchmark: str) -> Path:
    """Decode the split under evaluation (only it) once per manifest contents and frame settings."""
    out = cached_shards(cfg, manifest, benchmark)
    logger.info("%s", prepare(cfg, manifest, out, splits=(cfg.eval.split,)))
    return out


def check_frames(shards: Path, model: RetrievalModel) -> None:
    size = ShardSummary.read(shards).frame_spec["frame_size"]
    if size != model.image_size:
        raise ValueError(
            f"--shards {shards}: frames are {size} px but the model takes {model.image_size} px; "
            f"prepare them with data.frame_size={model.image_size} or pass --manifest to have them prepared"
        )


def excluded_videos(shards: Path, split: str) -> list[dict[str, str]]:
    path = shards / QUARANTINE_FILE
    if not path.is_file():
        return []
    rows = pq.read_table(path, columns=["video_id", "split", "reason", "error"]).to_pylist()
    return [{k: row[k] for k in ("video_id", "reason", "error")} for row in rows if row["split"] == split]


def score(
    model: RetrievalModel, encoded: EncodedSplit, cfg: Config, index: GalleryIndex | None = None
) -> dict[str, Retrieval]:
    """The configured mode first; with `eval.compare` and two_stage, the exhaustive scores beside it.
    `index`: the gallery's index, whose search gives two-stage its candidates."""
    results = {}
    if cfg.eval.mode == "two_stage":
        results["two_stage"] = two_stage(
            model, encoded.text, encoded.video, cfg.eval.topk, index, cfg.eval.shortlist, cfg.eval.top_frames
        )
    if cfg.eval.mode == "exhaustive" or cfg.eval.compare:
        results["exhaustive"] = exhaustive(
            model, encoded.text.to(model.device), encoded.video.to(model.device)
        )
    return results


def collect_metrics(results: dict[str, Retrieval], encoded: EncodedSplit, cfg: Config) -> dict[str, float]:
    """The configured mode's metrics under plain names; a compared run's under `exhaustive/`."""
    metrics: dict[str, float] = {}
    for mode, result in results.items():
        prefix = "" if mode == cfg.eval.mode else f"{mode}/"
        dsl = cfg.eval.dsl and mode == "exhaustive"
        found = retrieval_metrics(result.t2v, encoded.text_video, dsl=dsl, v2t_sim=result.v2t)
        metrics |= {f"{prefix}{key}": value for key, value in found.items()}
        metrics |= {f"time/{key}": value for key, value in result.timings_s.items()}
    if "two_stage" in results:  # stage 1's recall of the ground truth, and of the full score's top-1 when compared
        full = results["exhaustive"].t2v if "exhaustive" in results else None
        metrics |= stage1_metrics(results["two_stage"].coarse, encoded.text_video, full)
    if "two_stage" in results and "exhaustive" in results:
        metrics["speedup_vs_exhaustive"] = metrics["time/exhaustive_s"] / (
            metrics["time/stage1_s"] + metrics["time/stage2_s"]
        )
    return metrics


def draw(
    model: RetrievalModel,
    cfg: Config,
    shards: Path,
    encoded: EncodedSplit,
    results: dict[str, Retrieval],
    out: Path,
) -> list[Path]:
    ranks = {mode: query_ranks(r.t2v, encoded.text_video, r.v2t) for mode, r in results.items()}
    sizes = {"t2v": len(encoded.video_ids), "v2t": len(encoded.captions)}
    paths = [plots.recall_curves(ranks, sizes, out / "recall_at_k.png")]
    main = results[cfg.eval.mode]
    title = (
        "exhaustive scores"
        if main.rescored is None
        else f"two-stage: scores of each caption's top-{cfg.eval.topk}"
    )
    paths.append(
        plots.similarity_slice(
            main.t2v.cpu(),
            encoded.text_video,
            title,
            out / "similarity_slice.png",
            shown=None if main.rescored is None else main.rescored.cpu(),
        )
    )
    if can_explain(model) and cfg.eval.explain_queries > 0:
        queries = pick_queries(len(encoded.captions), cfg.eval.explain_queries)
        pairs = [
            (
                encoded.captions[q],
                encoded.video_ids[int(encoded.text_video[q])],
                int(ranks[cfg.eval.mode]["t2v"][q]),
            )
            for q in queries
        ]
        tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)
        for number, pair in enumerate(explain_pairs(model, tokenizer, shards, cfg.eval.split, pairs)):
            paths.append(plots.frame_selection(pair, out / f"frames_query{queries[number]}.png"))
    return paths


@dataclass
class JobInputs:
    """What a job on a model and a benchmark split starts from, resolved from its command line."""

    cfg: Config  # the command line's, with the trained model's `model` section and frame sampling
    model: RetrievalModel
    source: ModelSource
    benchmark: str
    manifest: Path | None
    shards: Path  # prepared shards, or where the manifest's split will be prepared
    dataset_fingerprint: str
    tracking_uri: str

    def tags(self, kind: str, description: str) -> dict[str, str]:
        """MLflow tags of the job's run: what it ran on (`kind`: evaluation or index)."""
        return {
            "benchmark": self.benchmark,
            "split": self.cfg.eval.split,
            "job": kind,
            **self.source.tags(),
            "dataset_fingerprint": self.dataset_fingerprint,
            **source_tags(description),
        }

    def dataset(self) -> DatasetInput:
        """The benchmark split as the run's MLflow dataset input."""
        return benchmark_input(
            self.benchmark, self.dataset_fingerprint, str(self.manifest or self.shards), {}, self.cfg.eval.split
        )


def open_job(cfg: Config, model_uri: str, manifest: Path | None, shards: Path | None) -> JobInputs:
    """Load the model behind `model_uri`, start Ray, and say which benchmark split the job runs on."""
    if (manifest is None) == (shards is None):
        raise ValueError("give exactly one of --manifest FILE or --shards DIR")
    manifest, shards = (Path(resolve_path(str(p))) if p is not None else None for p in (manifest, shards))
    if manifest is not None:  # a broken manifest names its line before the model loads or Ray starts
        index_manifest(manifest)
    else:
        ShardSummary.read(shards)
    uri = tracking_uri(cfg)
    with active_tracking_uri(uri):
        model, trained, source = load_model_source(model_uri)
    cfg = job_config(cfg, trained)
    if uses_frame_shortlist(cfg):  # refused before the gallery is encoded
        model.require_mean_frame_stage1()
    logger.info(f"model {source.uri}: {source.name} version {source.version}, "
                f"{cfg.model.preset}/{cfg.model.head}")

    ensure_ray()
    require_shared_paths({
        "--manifest": manifest, "--shards": shards, "eval.cache": cfg.eval.cache if manifest else None,
        "eval.out": cfg.eval.out, "index.cache": cfg.index.cache, "tracking.uri": uri,
    })
    benchmark = benchmark_name(cfg, manifest, shards)
    folder = cached_shards(cfg, manifest, benchmark) if manifest is not None else shards
    cfg = replace(cfg, data=replace(cfg.data, manifest=str(manifest) if manifest else None, shards=str(folder)))
    digest = fingerprint(manifest) if manifest else ShardSummary.read(shards).manifest_fingerprint
    return JobInputs(cfg, model, source, benchmark, manifest, folder, digest, uri)


def ready_shards(job: JobInputs) -> Path:
    """The split's shards, prepared first when the job was given a manifest; checked against the model."""
    shards = prepared_shards(job.cfg, job.manifest, job.benchmark) if job.manifest is not None else job.shards
    check_frames(shards, job.model)
    return shards


def evaluate(
    cfg: Config, model_uri: str, manifest: Path | None = None, shards: Path | None = None
) -> EvalOutcome:
    """Evaluate the model behind `model_uri` on a manifest (prepared and cached) or on prepared shards."""
    job = open_job(cfg, model_uri, manifest, shards)
    cfg, source = job.cfg, job.source
    tags = job.tags("evaluation", f"{source.name} version {source.version} ({cfg.model.head} head) on the "
                    f"{cfg.eval.split} split of {job.benchmark}, {cfg.eval.mode} scoring.")
    tags |= {"mode": cfg.eval.mode, "metric_conventions": METRIC_CONVENTIONS}
    stop_on_signals()  # again: ray.init put its own SIGTERM handler in place
    run = start_eval_run(job.tracking_uri, cfg, f"{source.label}-{cfg.eval.mode}", tags,
                         {"eval.model": model_uri}, job.dataset())
    with closing_run(job.tracking_uri, run.run_id):
        return _run_evaluation(job, run)


def _run_evaluation(job: JobInputs, run: EvalRun) -> EvalOutcome:
    cfg, model, source, benchmark, uri = job.cfg, job.model, job.source, job.benchmark, job.tracking_uri
    shards = ready_shards(job)
    excluded = excluded_videos(shards, cfg.eval.split)
    index = (
        matching_index(cfg, source, benchmark, shards, uri) if cfg.eval.mode == "two_stage" and cfg.index.use else None
    )
    if index is not None:
        logger.info(f"gallery: {len(index)} videos and stage 1 from index {index.meta['run_id']} "
                    f"({index.kind})")

    started = time.perf_counter()
    videos = None if index is None else (index.video_ids, index.features(kind=model.head.video_side_type))
    encoded = encode_with_actors(model, cfg, str(shards), cfg.eval.split, cfg.eval.num_actors, videos)
    encode_s = time.perf_counter() - started
    if torch.cuda.is_available():
        model.cuda()
    results = score(model, encoded, cfg, index)
    metrics = collect_metrics(results, encoded, cfg)
    metrics |= {
        "time/encode_s": encode_s,
        "videos": len(encoded.video_ids),
        "captions": len(encoded.captions),
        "excluded_videos": len(excluded),
    }

    out = Path(cfg.eval.out) / benchmark / f"{source.label}-{cfg.eval.mode}"
    artifacts = draw(model, cfg, shards, encoded, results, out)
    if (truth := ground_truth_rows(shards, cfg.eval.split, cfg.eval.mechanism_videos)) is not None:
        tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)
        mechanism = mechanism_metrics(model, tokenizer, truth, cfg.eval.mechanism_videos)
        metrics |= mechanism
        if mechanism:
            artifacts.append(plots.mechanism_bars(mechanism, f"{source.label} on {benchmark}", out / "mechanism.png"))
    report: dict[str, Any] = {
        "benchmark": benchmark,
        "split": cfg.eval.split,
        "shards": str(shards),
        "dataset_fingerprint": ShardSummary.read(shards).manifest_fingerprint,
        "model": {
            "uri": source.uri,
            "name": source.name,
            "version": source.version,
            "source_run": source.source_run,
        },
        "mode": cfg.eval.mode,
        "topk": cfg.eval.topk if cfg.eval.mode == "two_stage" else None,
        "shortlist": {"videos": cfg.eval.shortlist, "top_frames": cfg.eval.top_frames} if uses_frame_shortlist(cfg) else None,
        "index": None if index is None else {
            "run_id": index.meta["run_id"], "kind": index.kind, "nprobe": index.meta["nprobe"]
        },
        "metric_conventions": METRIC_CONVENTIONS,
        "metrics": metrics,
        "excluded": excluded,
    }
    artifacts.insert(0, write_report(report, out))
    log_eval_results(uri, run.run_id, mlflow_metric_names(metrics, cfg.eval.split), artifacts, source.model_id)
    return EvalOutcome(run.run_id, uri, run_url(uri, run.experiment_id, run.run_id), benchmark, source, metrics,
                       excluded, out, artifacts)


def uses_frame_shortlist(cfg: Config) -> bool:
    """Whether captions' stage 1 re-ranks a shortlist by its frames (`hvd.eval.retrieval.stage1_videos`)."""
    return cfg.eval.mode == "two_stage" and cfg.eval.shortlist > cfg.eval.topk


def stage1_line(metrics: dict[str, float]) -> str:
    """Stage 1's recall at each k it was measured at: of the ground truth, and of the full score's top-1."""
    ks = sorted(int(key.removeprefix("stage1/gt_R")) for key in metrics if key.startswith("stage1/gt_R"))
    if not ks:
        return ""
    line = f"top {'/'.join(map(str, ks))} hold the ground truth for " + "/".join(
        f"{metrics[f'stage1/gt_R{k}']:.1f}" for k in ks) + "%"
    if all(f"stage1/full_top1_R{k}" in metrics for k in ks):
        line += ", the full score's top-1 for " + "/".join(f"{metrics[f'stage1/full_top1_R{k}']:.1f}" for k in ks) + "%"
    return line


def summary_text(outcome: EvalOutcome, cfg: Config) -> str:
    """The printed report: what was evaluated, the timings, the metric table, where everything went."""
    m = outcome.metrics
    mode = cfg.eval.mode + (f" (top-{cfg.eval.topk})" if cfg.eval.mode == "two_stage" else "")
    if uses_frame_shortlist(cfg):
        mode += f" of a frame-ranked top-{cfg.eval.shortlist} (best {cfg.eval.top_frames} frames)"
    timings = ", ".join(
        f"{key.removeprefix('time/')} {value:.3f}" for key, value in m.items() if key.startswith("time/")
    )
    if "speedup_vs_exhaustive" in m:
        timings += f"; two-stage speed-up {m['speedup_vs_exhaustive']:.1f}x"
    lines = [
        f"benchmark  {outcome.benchmark}, split {cfg.eval.split}: {int(m['videos'])} videos, "
        f"{int(m['captions'])} captions, {len(outcome.excluded)} videos excluded (undecodable)",
        *(f"  excluded {e['video_id']}: {e['reason']}" for e in outcome.excluded),
        f"model      {outcome.source.name} version {outcome.source.version}"
        + (f" (training run {outcome.source.source_run})" if outcome.source.source_run else ""),
        f"mode       {mode}; ties ranked pessimistically",
        f"timings    {timings}",
        "",
        metric_table(m, ("", "exhaustive/") if cfg.eval.compare else ("",)),
        *([f"looked at  {line}"] if (line := mechanism_line(m)) else []),
        *([f"stage 1    {line}"] if (line := stage1_line(m)) else []),
        "",
        f"MLflow     run {outcome.run_id} in experiment {experiment_name(outcome.benchmark)}"
        f" at {outcome.tracking_uri} (metrics as {cfg.eval.split}/t2v/R1 ...)",
        f"run page   {outcome.run_url}",
        f"report     {outcome.out}",
    ]
    return "\n".join(lines)
