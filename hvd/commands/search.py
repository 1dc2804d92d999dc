r"""Search an indexed gallery with a caption: the best videos, their scores, and a contact sheet.

    python pipelines/search.py --model models:/hvd@champion "a red square in the top left"
    python pipelines/search.py --model models:/hvd/3 --top 10 "a man plays a guitar" eval.benchmark=msrvtt

The gallery is an index that pipelines/index.py built for this model version: the version's only one,
or the one of eval.benchmark and eval.split when it has several; --index runs:/RUN_ID/index or a
folder names one directly. Stage 1 takes the index's eval.topk nearest videos (an IVF index searches
index.nprobe lists), stage 2 rescores them with the full model; the --top best are printed, and drawn
one row of frames each (the frames the head kept for the caption framed green) into --sheet, by default
<eval.out>/search/<caption>.png. The frames come from the shards the index was built from.
Each search is an MLflow run in experiment eval/<benchmark> (tag job=search): the caption and --top as
params, the ranked videos (hits.json) and the contact sheet as artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from hvd.cli import fail, parse_args
from hvd.config import Config
from hvd.errors import HvdError
from hvd.eval import plots
from hvd.eval.report import experiment_name
from hvd.registry.runs import closing_run, experiment_id, log_params, run_url, source_tags, tracking_uri
from hvd.search.query import SearchHit, hit_frames
from hvd.search.retriever import Retriever

SECTIONS = ("eval", "index", "tracking")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, ...")
    parser.add_argument("query", help="the caption to search for")
    parser.add_argument("--index", metavar="URI|DIR", help="runs:/RUN_ID/index or an index folder")
    parser.add_argument("--top", type=int, default=5, help="results printed and drawn")
    parser.add_argument("--sheet", type=Path, metavar="PNG", help="where the contact sheet goes")


def sheet_path(cfg: Config, query: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-")[:60] or "query"
    return Path(cfg.eval.out) / "search" / f"{slug}.png"


def log_search(cfg: Config, retriever: Retriever, query: str, hits: list[SearchHit], sheet: Path) -> str:
    """The search as a FINISHED MLflow run beside the index's (experiment eval/<benchmark>, tag job=search), so
    what a caption found, and its contact sheet, can be looked at again in the UI; returns the run's page."""
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


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(__doc__, SECTIONS, argv, add_flags=add_flags)
    if args.top < 1:
        fail(f"--top {args.top}: must be at least 1")
    try:
        retriever = Retriever.open(args.model, cfg, args.index)
        (hits,) = retriever.search([args.query], args.top)
        index = retriever.index
        pairs = hit_frames(retriever.model, retriever.tokenizer, index.meta["shards"], index.meta["split"], args.query, hits)
    except (HvdError, FileNotFoundError, ValueError) as err:
        fail(err)
    sheet = plots.contact_sheet(args.query, pairs, [hit.score for hit in hits], args.sheet or sheet_path(cfg, args.query))
    page = log_search(cfg, retriever, args.query, hits, sheet)

    meta = index.meta
    print(f"gallery    {len(index)} videos of {meta['benchmark']}/{meta['split']} ({index.kind} index {meta['run_id']})")
    print(f'query      "{args.query}": top {len(hits)} of {min(max(cfg.eval.topk, args.top), len(index))} candidates')
    print(f"{'rank':>4}  {'score':>7}  {'stage 1':>7}  video")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:7.3f}  {hit.stage1_score:7.3f}  {hit.video_id}")
    print(f"sheet      {sheet}")
    print(f"run page   {page}")

