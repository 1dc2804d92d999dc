"""`cluster/local.sh mlflow`: the tracking server as `up` starts it, with basic auth and no job runner. A request
without the admin's password is refused, one with it works, and the password outlives `down` with the user database."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def local_sh(tmp_path):
    env = {**os.environ, "HVD_VENV": str(BIN.parent), "HVD_CLUSTER_DIR": str(tmp_path / "c"),
           "HVD_MLFLOW_DIR": str(tmp_path / "mlflow")}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"):
        env.pop(name, None)

    def run(command: str) -> dict[str, str]:
        result = subprocess.run([str(ROOT / "cluster" / "local.sh"), command], env=env, capture_output=True,
                                text=True, timeout=240)
        assert result.returncode == 0, f"local.sh {command}:\n{result.stderr[-3000:]}"
        return dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())

    try:
        yield run, tmp_path
    finally:
        run("down")


def test_the_tracking_server_refuses_requests_without_the_admin_password(local_sh, monkeypatch):
    run, tmp_path = local_sh
    exports = run("mlflow")
    uri, user, password = (exports[f"MLFLOW_TRACKING_{key}"] for key in ("URI", "USERNAME", "PASSWORD"))
    assert uri.startswith("http://127.0.0.1:") and user == "admin" and len(password) == 64

    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=30).status_code == 401
    assert requests.get(search, auth=(user, "not-the-password"), timeout=30).status_code == 401
    assert requests.get(search, auth=(user, password), timeout=30).status_code == 200
    assert requests.get(f"{uri}/health", timeout=30).status_code == 200  # what `up` and probes poll

    store = tmp_path / "mlflow"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE((store / "admin_password").stat().st_mode) == 0o600
    assert (store / "basic_auth.db").is_file()
    server = psutil.Process(int((tmp_path / "c" / "mlflow.pid").read_text()))
    listening = {c.laddr for p in [server, *server.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert [address.ip for address in listening] == ["127.0.0.1"]  # docs/security.md: MLflow server, 1 port
    # the server and its uvicorn worker, no job runner nor its huey consumers (docs/tracking.md)
    commands = [" ".join(p.cmdline()) for p in [server, *server.children(recursive=True)]]
    assert len(commands) == 2 and not [c for c in commands if "mlflow.server.jobs" in c or "huey" in c], commands

    # `down` and up again: the stored admin account still takes the stored password, and a client with it
    # logs runs and artifacts (proxied into the store) as every job does.
    run("down")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{uri}/health", timeout=30)
    assert run("mlflow") == exports
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(uri)
    created = client.create_run(client.create_experiment("auth"))
    client.log_text(created.info.run_id, "hello", "note.txt")
    assert [a.path for a in client.list_artifacts(created.info.run_id)] == ["note.txt"]
    assert list((store / "artifacts").rglob("note.txt"))
