r"""A bounded load run on the search service: p50/p99 latency and throughput of POST /search on loopback.

    python benchmarks/serve_load.py --model models:/hvd@latest [--replicas 1 2] [--requests 2000]
        [--concurrency 8] [--duration 300] [--warmup 50] [--top 5] [--spliced 1000000] [key=value ...]

For each gallery (the model version's linked index, or --index; with --spliced N also an index of N videos
spliced from it) and each replica count, the service starts as pipelines/serve.py starts it (a local Ray,
a free port on 127.0.0.1, a bearer token), takes --warmup requests, then at most --requests requests from
--concurrency clients (threads, each on its own keep-alive connection, sending its next request when the last
is answered), one caption each. Nothing is sent after --duration seconds: what was never sent is `not_sent`.
A request is `ok` on a 200 whose answer holds --top hits, `failed` on any other answer or a connection error,
`lost` when no answer came within --timeout. Latency: from sending to the whole answer read, at the client.
Throughput: ok requests per second of the timed part. Disk reads: the machine's during the timed part (a gallery
larger than the page cache reads its candidates' features from disk). Prints one JSON object.

The spliced index is built the way benchmarks/retrieval_speed.py builds its large galleries: the real
videos, then distractors that are the first s frames of one real video followed by the last T - s of
another, every row real encoded features. Its features are written to the index folder (--cache) row
block by row block, never held (a million demo videos: 17.9 GiB with their embeddings), its IVF index as
pipelines/index.py would build it; an index already there of that size is reused.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import secrets
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import faiss
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from retrieval_speed import SplicedGallery

from hvd.config import Config, load_config, replace_keys
from hvd.data.synthetic import COLOURS, REGIONS, SHAPES
from hvd.gallery import (
    ANN_FILE,
    FEATURES_FILE,
    IDS_FILE,
    META_FILE,
    SAFETENSORS_DTYPES,
    ann_bytes,
    ann_kind,
    build_ann,
)
from hvd.search.retriever import Retriever
from hvd.search.service import start_service, stop_service

SAFETENSORS_NAMES = {np.dtype(dtype): name for name, dtype in SAFETENSORS_DTYPES.items()}
CHUNK = 20_000  # spliced rows built, embedded and written at a time


def captions() -> list[str]:
    """Demo-benchmark-like captions (colour, shape, place), shuffled once: a fixed list every run sends alike."""
    every = [f"a {colour} {shape} {words[0]}" for colour in COLOURS for shape in SHAPES for _, words in REGIONS.values()]
    return [every[i] for i in np.random.default_rng(0).permutation(len(every))]


def write_spliced_index(retriever: Retriever, size: int, folder: Path, cfg: Config) -> None:
    """An index folder of `size` videos spliced from the retriever's gallery (see the module's docstring)."""
    source = retriever.index
    gallery = SplicedGallery.of_size(source.features(), size, blocks=max(1, len(retriever.model.head.vision_layers)))
    sample = gallery.rows(torch.arange(1))
    fields = {name: (getattr(sample, name).numpy().dtype, getattr(sample, name).shape[1:])
              for name in sample.field_names()}
    fields["embedding"] = (np.dtype(np.float32), (source.meta["dim"],))
    header, offset = {}, 0
    for name, (dtype, shape) in fields.items():
        length = size * math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": [size, *shape], "data_offsets": [offset, offset + length]}
        offset += length
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FEATURES_FILE
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    arrays = {name: np.memmap(path, dtype, "r+", 8 + len(text) + header[name]["data_offsets"][0], (size, *shape))
              for name, (dtype, shape) in fields.items() if math.prod(shape)}
    model = retriever.model
    with torch.no_grad():
        for start in range(0, size, CHUNK):
            rows = gallery.rows(torch.arange(start, min(start + CHUNK, size)))
            for name, array in arrays.items():
                array[start : start + len(rows)] = (model.video_embeddings(rows) if name == "embedding"
                                                    else getattr(rows, name)).numpy()
            print(f"spliced    {start + len(rows):,} of {size:,} videos", flush=True)
    for array in arrays.values():
        array.flush()
    embeddings = np.asarray(arrays["embedding"])
    started = time.perf_counter()
    ann = build_ann(embeddings, cfg.index)
    build_s = time.perf_counter() - started
    faiss.write_index(ann, str(folder / ANN_FILE))
    ids = source.video_ids + [f"splice{i}" for i in range(size - len(source))]
    pq.write_table(pa.table({"video_id": ids}), folder / IDS_FILE)
    meta = {**source.meta, "benchmark": f"{source.meta['benchmark']} spliced", "run_id": None,
            "spliced_from": source.meta["run_id"], "videos": size, "kind": ann_kind(ann),
            "ivf_lists": getattr(ann, "nlist", None), "nprobe": cfg.index.nprobe if ann_kind(ann) == "ivf" else None,
            "ann_bytes": ann_bytes(ann), "features_bytes": path.stat().st_size, "build_s": build_s}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: its presence means done


def spliced_index(model_uri: str, cfg: Config, index: str | None, size: int, cache: Path) -> Path:
    """The folder of the spliced index of `size` videos, built once."""
    retriever = Retriever.open(model_uri, cfg, index)
    folder = cache / f"spliced-{retriever.index.meta['run_id']}-{size}"
    if not (folder / META_FILE).is_file():
        write_spliced_index(retriever, size, folder, cfg)
    return folder


def load(url: str, token: str, texts: list[str], top: int, requests: int, concurrency: int, duration_s: float,
         timeout_s: float) -> dict:
    """`requests` POST /search from `concurrency` clients, none sent after `duration_s`; what came back."""
    address = urlparse(url)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    numbers = itertools.count()
    latencies: list[float] = []
    failed: Counter[str] = Counter()
    lost = [0]
    lock = threading.Lock()
    disk = psutil.disk_io_counters()
    started = time.perf_counter()
    deadline = started + duration_s

    def client() -> None:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout_s)
        while (number := next(numbers)) < requests and time.perf_counter() < deadline:
            body = json.dumps({"caption": texts[number % len(texts)], "top": top})
            sent = time.perf_counter()
            try:
                connection.request("POST", "/search", body, headers)
                response = connection.getresponse()
                answer = response.read()
                elapsed = time.perf_counter() - sent
                ok = response.status == 200 and len(json.loads(answer)["results"][0]["hits"]) == top
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        failed[f"status {response.status}"] += 1
            except TimeoutError:
                with lock:
                    lost[0] += 1
                connection.close()
            except Exception as err:  # counted by kind: every request sent is accounted for
                with lock:
                    failed[type(err).__name__] += 1
                connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    read = psutil.disk_io_counters()
    sent = next(numbers) - concurrency  # each client drew one number it did not send
    milliseconds = np.array(latencies) * 1e3
    row = {"requests": requests, "sent": sent, "ok": len(latencies), "failed": sum(failed.values()),
           "failures": dict(failed), "lost": lost[0], "not_sent": requests - sent, "concurrency": concurrency,
           "wall_s": round(wall_s, 2), "throughput_rps": round(len(latencies) / wall_s, 2),
           "disk_reads": read.read_count - disk.read_count,  # the machine's, meanwhile: stage 2's page faults among them
           "disk_read_MiB": round((read.read_bytes - disk.read_bytes) / 2**20, 1)}
    if len(latencies):
        row["latency_ms"] = {name: round(float(np.percentile(milliseconds, q)), 2)
                             for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, ...")
    parser.add_argument("--index", metavar="URI|DIR", help="runs:/RUN_ID/index or an index folder (default: linked)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per run")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds after which a run sends no more")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without an answer: the request is lost")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests before each run")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--spliced", type=int, nargs="*", default=[], metavar="N", help="also spliced galleries of N videos")
    parser.add_argument("--cache", type=Path, default=Path("data/bench-serve"), help="where spliced indexes are kept")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. serve.max_batch_size=32")
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as pipelines do: no bar per file
    cfg = load_config(None, [*args.overrides, "serve.host=127.0.0.1"])
    token = os.environ[cfg.serve.token_env] = secrets.token_hex(16)
    galleries = [args.index] + [str(spliced_index(args.model, cfg, args.index, size, args.cache)) for size in args.spliced]
    texts, rows = captions(), []
    for gallery in galleries:
        for replicas in args.replicas:
            served = start_service(replace_keys(cfg, {"serve.replicas": replicas}), args.model, gallery)
            try:
                version = json.loads(urlopen(Request(served.url + "/version", headers={
                    "Authorization": f"Bearer {token}"}), timeout=args.timeout).read())
                load(served.url, token, texts, args.top, args.warmup, args.concurrency, args.duration, args.timeout)
                row = load(served.url, token, texts, args.top, args.requests, args.concurrency, args.duration,
                           args.timeout)
            finally:
                stop_service()
            model = version["model"]
            rows.append({"model": f"{model['name']}/{model['version']}", "index": served.index,
                         "videos": version["index"]["videos"], "replicas": replicas, **row})
            print(json.dumps(rows[-1]), flush=True)
    settings = {"model": args.model, "top": args.top, "max_batch_size": cfg.serve.max_batch_size,
                "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s, "replica_cpus": cfg.serve.replica_cpus,
                "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}
    print(json.dumps({**settings, "runs": rows}, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
