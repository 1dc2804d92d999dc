"""The MLflow server's memory as `cluster/local.sh mlflow` starts it, with and without MLflow's job runner.

    python benchmarks/mlflow_server_memory.py [--settle-s 60]

Starts the server twice on a throwaway SQLite store under /tmp, once as shipped (no job runner) and once
with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true (MLflow's default), waits for its processes to settle, and
prints each process of the server's tree with its resident (RSS) and proportional (PSS, shared pages split
between the processes that map them) memory, and the sums. `local.sh down` stops each server (its
process group, by the pid `local.sh` recorded).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SWITCH = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def tree_memory(pid: int) -> list[tuple[str, int, int]]:
    """(command, RSS bytes, PSS bytes) of the process `pid` and each of its descendants."""
    root = psutil.Process(pid)
    rows = []
    for process in [root, *root.children(recursive=True)]:
        try:
            memory = process.memory_full_info()
            rows.append((" ".join(process.cmdline())[:90], memory.rss, memory.pss))
        except psutil.NoSuchProcess:
            continue
    return rows


def measure(job_runner: bool, settle_s: float) -> list[tuple[str, int, int]]:
    with tempfile.TemporaryDirectory(prefix="hvd-mlflow-memory-") as tmp:
        env = {**os.environ, "HVD_VENV": str(Path(sys.executable).parent.parent), "HVD_CLUSTER_DIR": f"{tmp}/c",
               "HVD_MLFLOW_DIR": f"{tmp}/mlflow", SWITCH: str(job_runner).lower()}

        def local_sh(command: str) -> None:
            subprocess.run([str(ROOT / "cluster" / "local.sh"), command], env=env, check=True, timeout=600,
                           stdout=subprocess.DEVNULL)

        local_sh("mlflow")
        try:
            time.sleep(settle_s)  # the job runner starts its huey consumers after the server answers
            return tree_memory(int(Path(tmp, "c", "mlflow.pid").read_text()))
        finally:
            local_sh("down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settle-s", type=float, default=60.0, help="wait after the server answers /health")
    args = parser.parse_args()
    mib = 2**20
    for job_runner in (True, False):
        rows = measure(job_runner, args.settle_s)
        print(f"\n{SWITCH}={str(job_runner).lower()}: {len(rows)} processes")
        for command, rss, pss in rows:
            print(f"  RSS {rss / mib:7.1f} MiB  PSS {pss / mib:7.1f} MiB  {command}")
        print(f"  total RSS {sum(r[1] for r in rows) / mib:.0f} MiB, PSS {sum(r[2] for r in rows) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
