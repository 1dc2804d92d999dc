"""A training run has one live driver, and ends KILLED, not RUNNING, when its driver is stopped by a signal."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from hvd.config import Config, load_config
from hvd.registry.runs import (
    HEARTBEAT_TAG,
    RunBusy,
    closing_run,
    finish_run,
    start_or_resume_run,
    tracking_uri,
)

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"train.storage_path={tmp_path}/ray",
                              "run.name=shared", *overrides])


def test_a_run_that_a_live_driver_trains_is_refused_until_that_driver_dies(tmp_path):
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from hvd.config import load_config
            from hvd.registry.runs import start_or_resume_run
            cfg = load_config(None, ["tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                     "train.storage_path={tmp_path}/ray", "run.name=shared"])
            print(start_or_resume_run(cfg, {{}}).run_id, flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        run_id = driver.stdout.readline().strip()
        assert run_id, "the first driver did not start its run"
        cfg = config(tmp_path)
        pattern = rf"{run_id} is being trained right now by another driver \(pid {driver.pid} on {socket.gethostname()}"
        with pytest.raises(RunBusy, match=pattern):
            start_or_resume_run(cfg, {})
    finally:
        driver.kill()
        driver.wait()
    resumed = start_or_resume_run(cfg, {})  # the kernel dropped the dead driver's lock: no stale lock to remove
    assert resumed.resumed and resumed.run_id == run_id
    finish_run(tracking_uri(cfg), run_id)


def test_without_a_local_storage_folder_a_fresh_heartbeat_marks_the_live_driver(tmp_path):
    cfg = config(tmp_path, "train.storage_path=s3://bucket/ray")
    first = start_or_resume_run(cfg, {})
    with pytest.raises(RunBusy, match=rf"{first.run_id} .*\(pid {os.getpid()} on .*, heartbeat \d+ s ago\)"):
        start_or_resume_run(cfg, {})
    client = MlflowClient(tracking_uri(cfg))
    client.set_tag(first.run_id, HEARTBEAT_TAG, f"{time.time() - 3600:.0f}")  # as a driver killed an hour ago
    again = start_or_resume_run(cfg, {})
    assert again.resumed and again.run_id == first.run_id
    finish_run(tracking_uri(cfg), again.run_id)
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_a_run_ends_killed_when_a_signal_stops_it_failed_when_an_error_does_finished_otherwise(tmp_path):
    cfg = config(tmp_path, "run.resume=never")
    client = MlflowClient(tracking_uri(cfg))
    for error, status in [
        (KeyboardInterrupt("SIGTERM"), "KILLED"),  # what hvd.runtime.stopping turns SIGTERM and SIGINT into
        (SystemExit(15), "KILLED"),  # what Ray's own SIGTERM handler raises
        (ValueError("a bug"), "FAILED"),
        (None, "FINISHED"),
    ]:
        run = start_or_resume_run(cfg, {})
        with contextlib.suppress(BaseException), closing_run(tracking_uri(cfg), run.run_id):
            if error is not None:
                raise error
        assert client.get_run(run.run_id).info.status == status, error


@pytest.mark.slow
def test_sigterm_ends_a_training_run_killed_and_leaves_no_process(tmp_path, monkeypatch):
    monkeypatch.setenv("HVD_ROOT", str(tmp_path))  # the same config here and in the driver, relative paths included
    overrides = ["synthetic.preset=tiny", "train.epochs=50", "train.batch_size=8", "model.pretrained=null",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "run.name=stopped"]
    command = [sys.executable, str(ROOT / "pipelines" / "train.py"), *overrides]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "HVD_ROOT": str(tmp_path)})
    process, seen = psutil.Process(driver.pid), {}
    for line in driver.stdout:
        if line.startswith("MLflow run"):
            break
    else:
        pytest.fail(f"the driver ended before its run started: {driver.stderr.read()[-3000:]}")
    run_id = line.split()[2]
    cfg = load_config(None, overrides)
    with pytest.raises(RunBusy, match=rf"{run_id} is being trained right now by another driver \(pid {driver.pid} "):
        start_or_resume_run(cfg, {})
    time.sleep(5)  # into Ray Train's fit: its controller and workers are up
    seen |= {child.pid: child for child in process.children(recursive=True)}
    stopped_at = time.time()
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    took = time.time() - stopped_at

    assert driver.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert took < 60
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert "SIGTERM received" not in stderr  # no C++ stack dump from Ray's failure signal handler
    client = MlflowClient(tracking_uri(cfg))
    assert client.get_run(run_id).info.status == "KILLED"
    _, alive = psutil.wait_procs(list(seen.values()), timeout=30)  # the reaper stops Ray's daemons
    assert not alive, [" ".join(p.cmdline())[:200] for p in alive]
    resumed = start_or_resume_run(cfg, {})  # the same command resumes it
    assert resumed.resumed and resumed.run_id == run_id
    finish_run(tracking_uri(cfg), run_id)
