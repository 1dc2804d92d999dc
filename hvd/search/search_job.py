"""The search job: a caption against a model's gallery index, its contact sheet, and an MLflow run recording both.

The run sits beside the index's (experiment eval/<benchmark>, tag job=search), so what a caption found can be
looked at again in the UI.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from hvd.config import Config
from hvd.eval import plots
from hvd.eval.report import experiment_name
from hvd.gallery import GalleryIndex
from hvd.registry.runs import closing_run, experiment_id, log_params, run_url, source_tags, tracking_uri
from hvd.search.query import SearchHit, hit_frames
from hvd.search.retriever import Retriever


@dataclass
class SearchOutcome:
    index: GalleryIndex
    hits: list[SearchHit]
    candidates: int  # how many videos stage 1 handed to stage 2
    sheet: Path
    run_url: str


def sheet_path(cfg: Config, query: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-")[:60] or "query"
    return Path(cfg.eval.out) / "search" / f"{slug}.png"


def search_gallery(
    cfg: Config, model_uri: str, query: str, top: int, index: str | None = None, sheet: Path | None = None
) -> SearchOutcome:
    """The `top` best videos for `query` in the gallery of `model_uri` (`Retriever.open` finds it, or `index` names
    it), drawn into `sheet` (default `sheet_path`) and logged as a FINISHED run."""
    retriever = Retriever.open(model_uri, cfg, index)
    (hits,) = retriever.search([query], top)
    gallery = retriever.index
    pairs = hit_frames(retriever.model, retriever.tokenizer, gallery.meta["shards"], gallery.meta["split"], query, hits)
    sheet = plots.contact_sheet(query, pairs, [hit.score for hit in hits], sheet or sheet_path(cfg, query))
    page = _log_search(cfg, retriever, query, hits, sheet)
    return SearchOutcome(gallery, hits, min(max(cfg.eval.topk, top), len(gallery)), sheet, page)


def _log_search(cfg: Config, retriever: Retriever, query: str, hits: list[SearchHit], sheet: Path) -> str:
    uri, meta, source = tracking_uri(cfg), retriever.index.meta, retriever.source
    client = MlflowClient(uri)
    experiment = experiment_id(client, experiment_name(meta["benchmark"]))
    description = (f'"{query}" searched in the {meta["split"]} split of {meta["benchmark"]} with {source.name} '
                   f"version {source.version} ({len(retriever.index)} videos, index run {meta['run_id']}).")
    tags = {"benchmark": meta["benchmark"], "split": meta["split"], "job": "search", "index_run": meta["run_id"],
            **source.tags(), **source_tags(description)}
    run_id = client.create_run(experiment, run_name=f"{source.label}-search", tags=tags).info.run_id
    with closing_run(uri, run_id):
        log_params(client, run_id, {"query": query, "top": len(hits), "eval.model": source.uri,
                                    "eval.topk": retriever.topk, "index.nprobe": retriever.nprobe})
        client.log_dict(run_id, [dataclasses.asdict(hit) for hit in hits], "hits.json")
        client.log_artifact(run_id, str(sheet))
    return run_url(uri, experiment, run_id)
