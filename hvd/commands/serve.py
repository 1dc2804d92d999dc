r"""Serve caption search over HTTP: a registered model and its gallery index as a Ray Serve application.

    python pipelines/serve.py --model models:/hvd@champion
    python pipelines/serve.py --model models:/hvd@champion serve.replicas=2 serve.port=8001
    HVD_SERVE_TOKEN=$(cat token) python pipelines/serve.py --model models:/hvd/3 serve.host=0.0.0.0

The gallery is the index pipelines/index.py built for the model version (as for pipelines/search.py:
eval.benchmark picks one of several; --index names one directly). Each of serve.replicas replicas loads
the model and the index once; the alias is resolved when the command starts, so every replica serves that
version. The API, on serve.host:serve.port (127.0.0.1:8000):

    POST /search   {"caption": "a red circle"} or {"captions": [...]}, and "top" (1 to eval.topk, default 5)
                   -> each caption's hits, best first: rank, video_id, score (the full model's), stage1_score
    GET  /health   -> {"status": "ok"}
    GET  /version  -> the model (URI, name, version, source run) and the index (run, benchmark, split, videos)

Captions of concurrent requests are ranked together, up to serve.max_batch_size per pass (also the most one
request may send), after waiting at most serve.batch_wait_timeout_s for more. When the variable serve.token_env
names (HVD_SERVE_TOKEN) is set, every request but /health needs `Authorization: Bearer <token>` (401 without);
without a token only loopback is served. Bad requests get 400 with the reason. Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import time

from hvd.cli import add_model_flag, fail, parse_args
from hvd.errors import HvdError

SECTIONS = ("serve", "eval", "index", "tracking")


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_model_flag(parser)
    parser.add_argument("--index", metavar="URI|DIR", help="runs:/RUN_ID/index or an index folder")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(__doc__, SECTIONS, argv, add_flags=add_flags)
    # the job's imports (torch, Ray, MLflow) only once the arguments are good: see hvd.cli
    from hvd.search.service import start_service, stop_service

    try:
        served = start_service(cfg, args.model, args.index)
    except (HvdError, FileNotFoundError, ValueError) as err:
        fail(err)
    try:
        print(f"model      {served.model} (from {args.model})\nindex      {served.index}", flush=True)
        print(f"serving    {served.url} with {cfg.serve.replicas} replica(s); Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    finally:
        stop_service()
