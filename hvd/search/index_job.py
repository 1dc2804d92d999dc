"""The gallery index job: encode a benchmark split once and keep it, with its FAISS index, in MLflow.

The job is a run in experiment eval/<benchmark> (tag job=index) whose artifacts are the index; the model
version points at it (`hvd.registry.index_links`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from hvd.config import Config
from hvd.data.shards import ShardSummary
from hvd.eval.actors import encode_videos_with_actors
from hvd.eval.job import JobInputs, open_job, ready_shards
from hvd.eval.report import log_eval_results, start_eval_run
from hvd.gallery import GalleryIndex, write_index
from hvd.model import VideoFeatures
from hvd.registry.index_links import index_tag, link_index, log_index
from hvd.registry.runs import closing_run, run_url
from hvd.runtime.stopping import stop_on_signals

EMBEDDING_CHUNK = 4096  # videos per first-stage embedding call


@dataclass
class IndexOutcome:
    index: GalleryIndex
    artifact_uri: str  # runs:/<run id>/index
    run_id: str
    run_url: str
    linked_to: str  # what carries the tag: "model version hvd/3", "run <id>", or "" (a checkpoint)
    timings_s: dict[str, float]


def in_chunks(embed: Callable[[VideoFeatures], torch.Tensor], device: torch.device, video: VideoFeatures) -> torch.Tensor:
    """`embed` (a model's video or frame embeddings) over the gallery, EMBEDDING_CHUNK videos at a time."""
    return torch.cat([
        embed(video[i : i + EMBEDDING_CHUNK].to(device)).cpu() for i in range(0, len(video), EMBEDDING_CHUNK)
    ])


def build_index(cfg: Config, model_uri: str, manifest: Path | None = None, shards: Path | None = None) -> IndexOutcome:
    """Encode the `eval.split` videos of a benchmark with the model behind `model_uri`, index them, log the
    index to MLflow and tag the model version with it."""
    job = open_job(cfg, model_uri, manifest, shards)
    cfg, source = job.cfg, job.source
    tags = job.tags("index", f"Gallery index of the {cfg.eval.split} split of {job.benchmark} for "
                             f"{source.name} version {source.version} ({cfg.model.head} head).")
    stop_on_signals()  # again: ray.init put its own SIGTERM handler in place
    run = start_eval_run(job.tracking_uri, cfg, f"{source.label}-index", tags, {"eval.model": model_uri},
                         job.dataset())
    with closing_run(job.tracking_uri, run.run_id):
        return _build(job, run.run_id, run_url(job.tracking_uri, run.experiment_id, run.run_id))


def _build(job: JobInputs, run_id: str, url: str) -> IndexOutcome:
    cfg, model, source = job.cfg, job.model, job.source
    shards = ready_shards(job)
    started = time.perf_counter()
    video_ids, video = encode_videos_with_actors(model, cfg, str(shards), cfg.eval.split, cfg.eval.num_actors)
    encode_s = time.perf_counter() - started

    started = time.perf_counter()
    if torch.cuda.is_available():
        model.cuda()
    meta = {
        "model": {"uri": source.uri, "name": source.name, "version": source.version,
                  "source_run": source.source_run, "head": cfg.model.head},
        "benchmark": job.benchmark,
        "split": cfg.eval.split,
        "shards": str(shards),
        "dataset_fingerprint": job.dataset_fingerprint,
        "frame_spec": ShardSummary.read(shards).frame_spec,
        "run_id": run_id,
    }
    folder = Path(cfg.index.cache) / run_id
    video = model.video_side(video)  # what the head derives from each video alone, stored so no search redoes it
    frames = in_chunks(model.frame_embeddings, model.device, video) if model.head.stage1_is_mean_frame else None
    index = write_index(folder, video_ids, video, in_chunks(model.video_embeddings, model.device, video), cfg.index,
                        meta, frames)
    build_s = time.perf_counter() - started

    client = MlflowClient(job.tracking_uri)
    artifact_uri = log_index(client, run_id, folder)
    metrics = {
        "videos": len(index),
        "time/encode_s": encode_s,
        "time/build_s": build_s,
        "index_bytes": index.meta["ann_bytes"],
        "features_bytes": index.meta["features_bytes"],
    }
    client.set_tag(run_id, "index_kind", index.kind)
    log_eval_results(job.tracking_uri, run_id, metrics, [], None)
    linked_to = link_index(client, source, index_tag(job.benchmark, cfg.eval.split), artifact_uri)
    return IndexOutcome(index, artifact_uri, run_id, url, linked_to, {"encode_s": encode_s, "build_s": build_s})
