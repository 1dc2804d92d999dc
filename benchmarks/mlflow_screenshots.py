"""Screenshots of the MLflow UI over a tiny real record, for docs/tracking.md.

    apt-get install chromium        # Debian's headless browser; nothing else is downloaded
    python benchmarks/mlflow_screenshots.py [--out docs/mlflow] [--keep DIR]

Under a throwaway folder in /tmp it trains the tiny synthetic benchmark (pipelines/train.py), evaluates the
registered version (pipelines/evaluate.py), indexes the test split and searches it (pipelines/index.py,
pipelines/search.py), each as a user runs it; then it starts `mlflow server` on that SQLite store (loopback,
no job runner), has headless Chromium photograph the training run, the model version and the evaluation's
artifacts and the search's contact sheet, and stops the server by its process group. --keep makes the record
in DIR and keeps it; a DIR that holds one already is photographed again as it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
WINDOW = "1600,1400"  # tall enough for the version page's schema
RENDER_MS = 20000  # the UI's own requests finish within this much of the browser's virtual time


def commands(store: Path) -> list[list[str]]:
    """The record: one tiny training run, its evaluation, its index and one search, each a pipeline command."""
    paths = [f"synthetic.out={store}/synth", f"data.shards={store}/shards", f"train.storage_path={store}/ray",
             f"tracking.uri=sqlite:///{store}/mlflow.db", f"eval.out={store}/eval", f"eval.cache={store}/cache",
             f"index.cache={store}/indexes"]
    model = ["--model", "models:/hvd/1"]
    return [
        ["train.py", "synthetic.preset=tiny", "model.pretrained=null", "train.batch_size=8", *paths],
        ["evaluate.py", *model, "--shards", f"{store}/shards", *paths],
        ["index.py", *model, "--shards", f"{store}/shards", *paths],
        ["search.py", *model, "--top", "3", "a red circle rises", *paths],
    ]


def make_record(store: Path) -> None:
    # a clean environment, as a user's first run: no cluster, tracking server or HVD_ROOT of the caller's
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_", "HVD_"))}
    for script, *args in commands(store):
        log = store / f"{Path(script).stem}.log"
        print(f"running pipelines/{script} (output in {log})", flush=True)
        with log.open("w") as out:  # cwd: the SQLite store keeps its artifacts in ./mlruns
            subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *args], cwd=store, env=env, check=True,
                           stdout=out, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on the store, in a session of its own so that its uvicorn worker stops with it."""
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db"],
        cwd=store, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=(store / "server.log").open("w"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {store / 'server.log'}") from None
            time.sleep(2)
    stop(server)
    raise RuntimeError(f"mlflow server not answering after 300 s; see {store / 'server.log'}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its pid), SIGKILL after 30 s."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def pages(store: Path, base: str) -> dict[str, str]:
    """File name -> the UI page it shows, found in the store the commands wrote."""
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    view = "?workflowType=machine_learning"  # as hvd's printed links open it (hvd.registry.runs.UI_VIEW)
    version = client.get_model_version("hvd", "1")
    training = client.get_run(version.run_id)
    evaluation = client.get_experiment_by_name("eval/synth")
    (evaluated,) = client.search_runs([evaluation.experiment_id], "tags.job = 'evaluation'")
    (searched,) = client.search_runs([evaluation.experiment_id], "tags.job = 'search'")
    frames = sorted(a.path for a in client.list_artifacts(evaluated.info.run_id) if a.path.startswith("frames_query"))
    (sheet,) = [a.path for a in client.list_artifacts(searched.info.run_id) if a.path.endswith(".png")]
    runs = f"{base}/#/experiments"
    return {
        "training-run.png": f"{runs}/{training.info.experiment_id}/runs/{training.info.run_id}{view}",
        "model-version.png": f"{base}/#/models/hvd/versions/1{view}",
        "evaluation-artifacts.png": f"{runs}/{evaluation.experiment_id}/runs/{evaluated.info.run_id}/artifacts/"
                                    f"{frames[0]}{view}",
        "search-sheet.png": f"{runs}/{evaluation.experiment_id}/runs/{searched.info.run_id}/artifacts/{sheet}{view}",
        "experiment-runs.png": f"{runs}/{evaluation.experiment_id}/runs{view}",
    }


def screenshot(browser: str, url: str, path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="hvd-chromium-") as profile:  # no state carried between pages
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={WINDOW}", f"--virtual-time-budget={RENDER_MS}",
                        f"--screenshot={path}", url], check=True, timeout=300, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow", help="where the PNGs go")
    parser.add_argument("--keep", type=Path, help="make the record in this folder and keep it")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    store = args.keep or Path(tempfile.mkdtemp(prefix="hvd-screenshots-"))
    store.mkdir(parents=True, exist_ok=True)
    try:
        if not (store / "mlflow.db").exists():
            make_record(store)
        server = start_server(store, port := free_port())
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            for name, url in pages(store, f"http://127.0.0.1:{port}").items():
                screenshot(browser, url, args.out / name)
                print(f"{args.out / name}  {url}")
        finally:
            stop(server)
    finally:
        if args.keep is None:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
