"""Caption search as a Ray Serve application: each replica holds one `Retriever` and answers an HTTP JSON API.

    POST /search   {"caption": "..."} or {"captions": [...]}, and "top" (1 to eval.topk, default 5)
                   -> {"results": [{"caption": ..., "hits": [{"rank", "video_id", "score", "stage1_score"}]}]}
    GET  /health   -> {"status": "ok"}: a replica holds its model and index; needs no token
    GET  /version  -> the model version and the gallery index served

The driver pins what the replicas load (`models:/NAME@ALIAS` to its version, the linked index to its run), so
every replica serves the same version however the alias moves. Captions of concurrent requests are ranked in
one `Retriever.search` call (`serve.batch`, up to serve.max_batch_size captions); `top` is at most eval.topk,
so a caption's candidates are stage 1's eval.topk whatever it was batched with. With a token (the variable
serve.token_env names), every request but /health needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

from ray import serve
from ray.exceptions import RayError
from starlette.requests import Request
from starlette.responses import JSONResponse

from hvd.config import Config, ConfigError
from hvd.errors import HvdError
from hvd.runtime.cluster import ensure_ray
from hvd.runtime.stopping import stop_on_signals
from hvd.runtime.worker_setup import verbose
from hvd.search.query import SearchHit
from hvd.search.retriever import Retriever

APP = "hvd-search"
ROUTES = {"/health": "GET", "/version": "GET", "/search": "POST"}
DEFAULT_TOP = 5
MAX_CAPTION_CHARS = 1000  # far past any caption; the tokenizer keeps data.max_words tokens of it anyway


class ServeStartError(HvdError, RuntimeError):
    """Ray Serve could not start the application: its proxy could not listen, or a replica could not load."""


class BadRequest(ValueError):
    """A request the API cannot answer; the message (the 400 response's `error`) says what to send instead."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(cfg: Config) -> str | None:
    """The bearer token from the variable serve.token_env names. Without one, only loopback is served: anywhere
    else (a cluster node's interface, 0.0.0.0) anyone who reaches the port could search."""
    token = os.environ.get(cfg.serve.token_env) or None
    if token is None and not is_loopback(cfg.serve.host):
        raise ConfigError(f"bad value for 'serve.host': {cfg.serve.host!r} (beyond loopback every request needs a "
                          f"token: set {cfg.serve.token_env}, or serve on serve.host=127.0.0.1)")
    return token


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_search(body: bytes, max_captions: int, max_top: int) -> tuple[list[str], int]:
    """A /search body's captions and `top`, or `BadRequest` naming what is wrong."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not JSON ({err})") from None
    if not isinstance(payload, dict):
        raise BadRequest('the body must be a JSON object: {"caption": "...", "top": 5}')
    if unknown := sorted(payload.keys() - {"caption", "captions", "top"}):
        raise BadRequest(f"unknown field {', '.join(map(repr, unknown))}: send caption or captions, and top")
    if ("caption" in payload) == ("captions" in payload):
        raise BadRequest('send one of "caption" (a string) and "captions" (a list of strings)')
    captions = [payload["caption"]] if "caption" in payload else payload["captions"]
    if not isinstance(captions, list) or not 1 <= len(captions) <= max_captions:
        raise BadRequest(f'"captions" must be a list of 1 to {max_captions} strings (serve.max_batch_size)')
    for number, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise BadRequest(f"caption {number} is empty or not a string")
        if len(caption) > MAX_CAPTION_CHARS:
            raise BadRequest(f"caption {number} is {len(caption)} characters long (at most {MAX_CAPTION_CHARS})")
    top = payload.get("top", min(DEFAULT_TOP, max_top))
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= max_top:
        raise BadRequest(f'"top" must be an integer from 1 to {max_top} (eval.topk: the candidates stage 1 keeps)')
    return captions, top


def describe(retriever: Retriever) -> dict[str, Any]:
    """What /version answers: the model version and the gallery index this replica serves."""
    source, index = retriever.source, retriever.index
    return {
        "model": {"uri": source.uri, "name": source.name, "version": source.version, "source_run": source.source_run},
        "index": {"run_id": index.meta.get("run_id"), "benchmark": index.meta.get("benchmark"),
                  "split": index.meta.get("split"), "videos": len(index), "kind": index.kind},
        "stage1_candidates": retriever.topk,
    }


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def captions_of(requests: list[tuple[list[str], int]]) -> int:
    return sum(len(captions) for captions, _ in requests)


@serve.deployment
class SearchService:
    """One replica: the pinned model and index, loaded once, answering the API."""

    def __init__(self, model_uri: str, cfg: Config, index: str, token_sha256: bytes | None) -> None:
        self.retriever = Retriever.open(model_uri, cfg, index)
        self.version = describe(self.retriever)
        self.token_sha256 = token_sha256  # the token's hash: the deployment's stored arguments never hold it
        self.max_captions, self.max_top = cfg.serve.max_batch_size, cfg.eval.topk
        self.rank.set_max_batch_size(cfg.serve.max_batch_size)
        self.rank.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    def authorized(self, request: Request) -> bool:
        if self.token_sha256 is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(digest(token.strip()), self.token_sha256)

    @serve.batch(batch_size_fn=captions_of)
    async def rank(self, requests: list[tuple[list[str], int]]) -> list[list[list[SearchHit]]]:
        """Every caption of a batch of requests in one `Retriever.search` call, on a thread so that the replica
        keeps taking requests (the next batch) meanwhile; each request gets its own captions' `top` best."""
        captions = [caption for batch, _ in requests for caption in batch]
        hits = await asyncio.to_thread(self.retriever.search, captions, max(top for _, top in requests))
        answers, start = [], 0
        for batch, top in requests:
            answers.append([found[:top] for found in hits[start : start + len(batch)]])
            start += len(batch)
        return answers

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path == "/health" and request.method == "GET":
            return JSONResponse({"status": "ok"})
        if not self.authorized(request):
            return error(401, "this service needs a token: send Authorization: Bearer <token>",
                         {"WWW-Authenticate": "Bearer"})
        if path not in ROUTES:
            return error(404, f"no {path}: the API is {', '.join(f'{m} {p}' for p, m in ROUTES.items())}")
        if request.method != ROUTES[path]:
            return error(405, f"{path} takes {ROUTES[path]}", {"Allow": ROUTES[path]})
        if path == "/version":
            return JSONResponse(self.version)
        try:
            captions, top = parse_search(await request.body(), self.max_captions, self.max_top)
        except BadRequest as err:
            return error(400, str(err))
        found = await self.rank((captions, top))
        return JSONResponse({"results": [{"caption": caption, "hits": [dataclasses.asdict(hit) for hit in hits]}
                                         for caption, hits in zip(captions, found, strict=True)]})


def pinned(retriever: Retriever, index: str | None) -> tuple[str, str]:
    """The model URI and index location every replica loads: the registry version behind an alias, and the
    index run (or the folder, made absolute) that was found."""
    source = retriever.source
    model = f"models:/{source.name}/{source.version}" if source.uri.startswith("models:/") else source.uri
    if index is None:
        return model, f"runs:/{retriever.index.meta['run_id']}/index"
    return model, str(Path(index).resolve()) if Path(index).is_dir() else index


def url(cfg: Config) -> str:
    host = f"[{cfg.serve.host}]" if ":" in cfg.serve.host else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}"


class Served(NamedTuple):
    url: str
    model: str  # the URI every replica loaded (an alias resolved to its version)
    index: str  # the index run's URI, or a folder


def start_service(cfg: Config, model_uri: str, index: str | None = None) -> Served:
    """Serve `model_uri` with its gallery (`--index`, else the linked one) on serve.host:serve.port, once every
    replica holds the model and the index.

    The driver opens the model and index first, so a bad URI or a missing index fails here as one line,
    before any replica starts (and Serve retries it)."""
    token = read_token(cfg)
    model, gallery = pinned(Retriever.open(model_uri, cfg, index), index)
    ensure_ray()
    logs = {"log_level": "INFO" if verbose() else "WARNING"}  # INFO: a line per request, from every replica
    logging.getLogger("ray.serve").setLevel(logs["log_level"])
    app = SearchService.options(
        num_replicas=cfg.serve.replicas,
        max_ongoing_requests=2 * cfg.serve.max_batch_size,  # a batch ranked while the next one gathers
        ray_actor_options={"num_cpus": cfg.serve.replica_cpus},
    ).bind(model, cfg, gallery, digest(token) if token else None)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=logs)
        serve.run(app, name=APP, route_prefix="/", logging_config=logs)
    except (RayError, RuntimeError) as err:  # a port taken, a replica that cannot load: one line, Serve stopped
        stop_service()
        cause = str(getattr(err, "cause", None) or err).strip().splitlines()[0]
        raise ServeStartError(f"Ray Serve could not serve {url(cfg)}: {cause}") from None
    stop_on_signals()  # again: ray.init put its own SIGTERM handler in place
    return Served(url(cfg), model, gallery)


def stop_service() -> None:
    """Delete the application, and shut Serve down (its proxies stop listening) unless other applications use it."""
    serve.delete(APP)
    if not serve.status().applications:
        serve.shutdown()
