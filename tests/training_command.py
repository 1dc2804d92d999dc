"""One run of the real training command, watched: the stress harness's smoke and the loopback test read the
same run, as each alone costs the suite a minute and a half of Ray start-up and training."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("train_stress", ROOT / "benchmarks" / "train_stress.py")
train_stress = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_stress)

Listener = tuple[int, str, str, int]  # pid, command, address, port


def listening(root: psutil.Process) -> set[Listener]:
    """Every listening inet socket of `root` and its descendants."""
    found = set()
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for process in processes:
        try:
            command = " ".join(process.cmdline())
            connections = process.net_connections(kind="inet")
            sockets = [c.laddr for c in connections if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
        found.update((process.pid, command[:100], address.ip, address.port) for address in sockets)
    return found


@dataclass
class WatchedRun:
    summary: dict  # the harness's own summary of its one run
    log: str  # the command's output
    listeners: set[Listener]  # every socket the command and its descendants listened on, sampled until it exited


def run_training_command(workdir: Path) -> WatchedRun:
    """`benchmarks/train_stress.py --runs 1` on the tiny benchmark, on the default local Ray: none of the RAY_,
    MLFLOW_ or HVD_ variables reach it, so the command starts its own Ray as a user's would."""
    overrides = [
        "synthetic.preset=tiny", f"synthetic.out={workdir}/synth", f"data.shards={workdir}/shards",
        "train.batch_size=8", f"train.storage_path={workdir}/ray", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
        "model.pretrained=null",  # one training run, as the harness counts them
    ]
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith(("RAY_", "MLFLOW_", "HVD_"))}
    outcome: dict = {}
    harness = threading.Thread(target=lambda: outcome.update(train_stress.stress(1, overrides, workdir / "logs")))
    seen: set[Listener] = set()
    try:
        harness.start()
        me = psutil.Process()
        while harness.is_alive():
            for child in me.children():
                try:
                    if str(train_stress.PIPELINE) in child.cmdline():
                        seen |= listening(child)
                except psutil.Error:
                    continue
            time.sleep(0.5)  # each look parses every process's socket tables: it competes with the run it watches
        harness.join()
    finally:
        os.environ.update(saved)
    return WatchedRun(outcome, (workdir / "logs" / "stress-1.log").read_text(), seen)
