"""Stop the local Ray a pipeline started when the pipeline dies, however it dies.

`ray.init()` starts Ray's daemons as the driver's descendants and stops them at a normal exit. A driver
killed outright (SIGKILL, SIGTERM, an OOM kill) runs no exit code: the raylet and GCS follow it, but the
dashboard and runtime-env agents (about 210 MB) linger for one to two minutes, and repeated runs pile
them up. A small watcher, in a session of its own so that the terminal's Ctrl-C does not reach it,
notes the driver's descendants every second and, once the driver is gone, stops those still running,
and any other process of the same Ray session (a worker started in the driver's last second, whose
parent, the raylet, died with the driver before the watcher saw it).

    python -m hvd.runtime.reaper PID      what `watch_descendants` starts; not meant to be run by hand
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psutil

POLL_S = 1.0
GRACE_S = 5.0  # between SIGTERM and SIGKILL
RAY_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")  # in every Ray process's arguments


def _sessions(process: psutil.Process) -> set[str]:
    try:
        return set(RAY_SESSION.findall(" ".join(process.cmdline())))
    except psutil.Error:
        return set()


def watch_descendants() -> None:
    """Start the watcher for this process (once per process)."""
    if getattr(watch_descendants, "started", False):
        return
    subprocess.Popen(
        [sys.executable, "-m", "hvd.runtime.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    watch_descendants.started = True


def reap(pid: int) -> None:
    """Wait for process `pid` to end, then stop every descendant of it seen alive in its last second."""
    me = os.getpid()
    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    sessions: set[str] = set()
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            # psutil.Process keeps each one's start time, so a pid reused later is never mistaken for it
            new = [child for child in driver.children(recursive=True) if child.pid != me and child.pid not in seen]
        except psutil.NoSuchProcess:
            break
        for child in new:
            sessions |= _sessions(child)
            seen[child.pid] = child
        time.sleep(POLL_S)
    if sessions:
        seen.update({p.pid: p for p in psutil.process_iter() if p.pid != me and _sessions(p) & sessions})
    left = [process for process in seen.values() if process.is_running()]
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    reap(int(sys.argv[1]))
