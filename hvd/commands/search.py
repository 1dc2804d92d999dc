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
from pathlib import Path

from hvd.cli import add_model_flag, fail, parse_args
from hvd.errors import HvdError

SECTIONS = ("eval", "index", "tracking")


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_model_flag(parser)
    parser.add_argument("query", help="the caption to search for")
    parser.add_argument("--index", metavar="URI|DIR", help="runs:/RUN_ID/index or an index folder")
    parser.add_argument("--top", type=int, default=5, help="results printed and drawn")
    parser.add_argument("--sheet", type=Path, metavar="PNG", help="where the contact sheet goes")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(__doc__, SECTIONS, argv, add_flags=add_flags)
    if args.top < 1:
        fail(f"--top {args.top}: must be at least 1")
    # the job's imports (torch, Ray, MLflow) only once the arguments are good: see hvd.cli
    from hvd.search.search_job import search_gallery

    try:
        outcome = search_gallery(cfg, args.model, args.query, args.top, args.index, args.sheet)
    except (HvdError, FileNotFoundError, ValueError) as err:
        fail(err)
    meta = outcome.index.meta
    print(f"gallery    {len(outcome.index)} videos of {meta['benchmark']}/{meta['split']} "
          f"({outcome.index.kind} index {meta['run_id']})")
    print(f'query      "{args.query}": top {len(outcome.hits)} of {outcome.candidates} candidates')
    print(f"{'rank':>4}  {'score':>7}  {'stage 1':>7}  video")
    for hit in outcome.hits:
        print(f"{hit.rank:>4}  {hit.score:7.3f}  {hit.stage1_score:7.3f}  {hit.video_id}")
    print(f"sheet      {outcome.sheet}")
    print(f"run page   {outcome.run_url}")
