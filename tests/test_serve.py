"""Caption search as a service: `pipelines/serve.py` in a process of its own (its own local Ray) serves the
champion with its linked index over real HTTP on loopback, as `Retriever.search` ranks, and stops on SIGTERM
with nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from hvd.commands.serve import main as serve_main
from hvd.config import load_config
from hvd.search.index_job import build_index
from hvd.search.retriever import Retriever

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
MAX_BATCH = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def indexed(registered) -> dict:
    """`registered`'s version with a gallery index of its benchmark's test split, built and linked by the index job."""
    cfg = registered["cfg"]
    outcome = build_index(cfg, f"models:/hvd/{registered['version']}", manifest=registered["manifest"])
    return {**registered, "overrides": [f"tracking.uri={cfg.tracking.uri}", f"index.cache={cfg.index.cache}"],
            "index_run": outcome.run_id, "videos": len(outcome.index)}


class Service:
    """`pipelines/serve.py` in a process of its own; its stdout is read as it comes, its stderr kept in a file."""

    def __init__(self, indexed: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr = indexed["root"] / "serve.err"
        env = {**os.environ, "HVD_SERVE_TOKEN": TOKEN}
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # its store and a Ray of its own
            env.pop(name, None)
        command = [sys.executable, "pipelines/serve.py", "--model", "models:/hvd@champion", *indexed["overrides"],
                   f"serve.port={self.port}", f"serve.max_batch_size={MAX_BATCH}", "serve.batch_wait_timeout_s=0.05"]
        with self.stderr.open("w") as err:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("serving"):
                self.ready.set()
        self.ready.set()  # it ended: whoever waits looks at why

    def call(self, method: str, path: str, body: object = None, token: str | None = TOKEN,
             raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def search(self, body: dict) -> list[list[dict]]:
        status, answer = self.call("POST", "/search", body)
        assert status == 200, answer
        return [result["hits"] for result in answer["results"]]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def service(indexed):
    started = Service(indexed)
    try:
        assert started.ready.wait(timeout=600) and started.process.poll() is None, (
            "".join(started.lines) + started.stderr.read_text())
        yield started
    finally:
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait(timeout=60)


@pytest.fixture(scope="module")
def retriever(indexed, service):
    """The same model and index opened here, as pipelines/search.py opens them, with the replica's one thread."""
    cfg = load_config(None, indexed["overrides"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Retriever.open(f"models:/hvd/{indexed['version']}", cfg)
    torch.set_num_threads(threads)


def expected(retriever: Retriever, captions: list[str], top: int) -> list[list[dict]]:
    return [[{"rank": h.rank, "video_id": h.video_id, "score": pytest.approx(h.score, rel=1e-5, abs=1e-6),
              "stage1_score": pytest.approx(h.stage1_score, rel=1e-5, abs=1e-6)} for h in hits]
            for hits in retriever.search(captions, top)]


def test_serving_beyond_loopback_without_a_token_is_refused_before_anything_starts(monkeypatch, capsys):
    monkeypatch.delenv("HVD_SERVE_TOKEN", raising=False)
    with pytest.raises(SystemExit) as done:
        serve_main(["--model", "models:/hvd@champion", "serve.host=0.0.0.0"])
    assert done.value.code == 2
    assert "'serve.host': '0.0.0.0' (beyond loopback every request needs a token: set HVD_SERVE_TOKEN" in (
        capsys.readouterr().err)


@pytest.mark.slow
def test_health_needs_no_token_and_version_names_the_pinned_model_and_index(service, indexed):
    version = str(indexed["version"])
    assert f"model      models:/hvd/{version} (from models:/hvd@champion)\n" in service.lines
    assert service.call("GET", "/health", token=None) == (200, {"status": "ok"})
    status, answer = service.call("GET", "/version")
    assert status == 200
    assert answer["model"] == {"uri": f"models:/hvd/{version}", "name": "hvd", "version": version,
                               "source_run": indexed["run_id"]}
    assert answer["index"] == {"run_id": indexed["index_run"], "benchmark": "bench", "split": "test",
                               "videos": indexed["videos"], "kind": "flat"}


@pytest.mark.slow
def test_search_ranks_as_the_retriever_does(service, retriever):
    captions = ["a red circle rises", "a small blue square on the left", "two green dots"]
    assert service.search({"captions": captions, "top": 7}) == expected(retriever, captions, 7)
    (hits,) = service.search({"caption": captions[0]})  # top defaults to 5
    assert hits == expected(retriever, captions[:1], 5)[0]


@pytest.mark.slow
def test_concurrent_requests_are_ranked_together_each_with_its_own_top(service, retriever):
    bodies = [{"caption": f"a {colour} {shape}", "top": 1 + i % 6} for i, (colour, shape) in
              enumerate((c, s) for c in ("red", "blue", "white") for s in ("circle", "bar", "cross"))]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(service.search, bodies))
    for body, (hits,) in zip(bodies, answers, strict=True):
        assert hits == expected(retriever, [body["caption"]], body["top"])[0]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "raw", "status", "says"), [
    ({"caption": "   "}, None, 400, "caption 0 is empty"),
    ({"captions": ["a red circle", 3]}, None, 400, "caption 1 is empty or not a string"),
    ({"captions": ["a"] * (MAX_BATCH + 1)}, None, 400, f"a list of 1 to {MAX_BATCH} strings"),
    ({"caption": "a red circle", "top": 0}, None, 400, '"top" must be an integer from 1 to 50'),
    ({"caption": "a red circle", "top": 51}, None, 400, '"top" must be an integer from 1 to 50'),
    ({"caption": "a", "captions": ["b"]}, None, 400, 'send one of "caption"'),
    ({"query": "a red circle"}, None, 400, "unknown field 'query'"),
    (None, b"{not json", 400, "the body is not JSON"),
    (None, b'["a red circle"]', 400, "the body must be a JSON object"),
])
def test_bad_requests_get_400_saying_what_is_wrong(service, body, raw, status, says):
    got, answer = service.call("POST", "/search", body, raw=raw)
    assert got == status and says in answer["error"]


@pytest.mark.slow
def test_unknown_paths_and_methods_and_missing_tokens(service):
    assert service.call("GET", "/search")[0] == 405
    assert service.call("GET", "/videos")[0] == 404
    for token in (None, "wrong-token"):
        for method, path in (("GET", "/version"), ("POST", "/search")):
            status, answer = service.call(method, path, {"caption": "a red circle"}, token=token)
            assert status == 401 and "Authorization: Bearer" in answer["error"]


@pytest.mark.slow
def test_every_listener_is_on_loopback_but_the_replicas_grpc_server_which_needs_rays_token(service):
    """As docs/security.md says: Serve's proxy on serve.host:serve.port, and one port off loopback, Ray Serve's
    inter-deployment gRPC server in the replica, which refuses a call without Ray's token."""
    driver = psutil.Process(service.process.pid)
    listening = []
    for process in [driver, *driver.children(recursive=True)]:
        try:
            sockets = [c.laddr for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            listening += [(process.cmdline()[0], address) for address in sockets]
        except psutil.Error:
            continue
    assert ("ray::ProxyActor", ("127.0.0.1", service.port)) in [(name, tuple(a)) for name, a in listening]
    (off_loopback,) = [(name, address) for name, address in listening if address.ip not in LOOPBACK]
    assert off_loopback[0] == "ray::ServeReplica:hvd-search:SearchService" and off_loopback[1].ip in ("::", "0.0.0.0")
    channel = grpc.insecure_channel(f"127.0.0.1:{off_loopback[1].port}")
    call = channel.unary_stream("/ray.serve.ASGIService/HandleRequest")
    with pytest.raises(grpc.RpcError) as refused:
        list(call(b"", timeout=30))
    channel.close()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_sigterm_shuts_serve_down_and_leaves_no_process(service):
    """Last in the module: it stops the service the others used."""
    children = psutil.Process(service.process.pid).children(recursive=True)
    assert service.stop() == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in service.stderr.read_text()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(service.url + "/health", timeout=10)
    deadline = time.time() + 60  # the reaper stops what the driver's exit leaves, within seconds
    while (alive := [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and (
            time.time() < deadline):
        time.sleep(1)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]
