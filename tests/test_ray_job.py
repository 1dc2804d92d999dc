"""`ray job submit -- python pipelines/train.py` against a local head that this test starts and stops."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head in its own process group, with token auth on; yields (dashboard address, env)."""
    workdir = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # as cluster/local.sh: SIGTERM stops the head at once
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            f"--port={_free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
            # the job agent's port too: its default (52365) is taken by any other Ray on the machine
            f"--dashboard-agent-listen-port={_free_port()}",
            "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={workdir / 'ray'}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray dashboard did not come up"
            time.sleep(2)
        yield address, env, workdir
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # Ray daemons that left our process group still name our private temp dir: stop exactly those
        subprocess.run(["pkill", "-9", "-f", str(workdir)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def test_train_runs_as_a_ray_job(ray_head):
    address, env, workdir = ray_head
    overrides = [
        "synthetic.preset=tiny", f"synthetic.out={workdir}/synth", f"data.shards={workdir}/shards",
        "train.epochs=1", "train.batch_size=8", f"train.storage_path={workdir}/storage",
        f"tracking.uri=sqlite:///{workdir}/mlflow.db", "run.name=ray-job",
        # the default warm start, in miniature: the job trains it first, on the cluster, then fine-tunes from it
        f"pretrain.out={workdir}/pretrained", "pretrain.train_stills=64", "pretrain.val_stills=16",
        "pretrain.epochs=1", "pretrain.batch_size=16",
    ]
    submit = ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--"]
    deadline = time.time() + 120  # a head just started refuses jobs until its job agent is up
    while True:
        result = subprocess.run(
            [*submit, "python", "pipelines/train.py", *overrides], env=env, capture_output=True, text=True, timeout=900
        )
        if "No available agent to submit job" not in result.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "registered      hvd version 1" in result.stdout  # the driver's summary, streamed back
    assert "warm start      " in result.stdout and "models:/clip-tiny-synthetic/1" in result.stdout
    quiet = [line for line in result.stdout.splitlines() if line.strip()]
    noise = ("Reporting training result", "INFO streaming_executor", "Checkpoint successfully created", "mlflow.system")
    assert not [line for line in quiet if any(n in line for n in noise)], "Ray's and MLflow's info logs reached the terminal"
    assert len(quiet) < 60, f"{len(quiet)} lines for a one-epoch run:\n" + "\n".join(quiet)
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hvd").experiment_id])
    assert run.info.status == "FINISHED" and "test/t2v/R1" in run.data.metrics

    failing = subprocess.run(
        [*submit, "python", "pipelines/train.py", "model.head=nonsense"], env=env, capture_output=True, text=True, timeout=300
    )
    assert failing.returncode != 0  # a failed job fails the submit command
