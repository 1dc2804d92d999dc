"""Ray for a pipeline: the cluster named by RAY_ADDRESS, else a local Ray that listens on loopback only."""

from __future__ import annotations

import logging
import os
import sys
from unittest.mock import patch

import ray
import ray._private.ray_constants as ray_constants
import ray.data

from hvd.runtime.reaper import watch_descendants
from hvd.runtime.worker_setup import FOOTER_READERS, FOOTER_READERS_ENV, quiet_logs, runtime_env, verbose

LOOPBACK = "127.0.0.1"
# What a local Ray's daemons and workers inherit, as `cluster/local.sh` sets it. Ray's one-machine mode
# keeps 127.0.0.1 as the node's address (otherwise Ray swaps in the machine's routable one, and GCS, raylet,
# workers and agents listen on every interface); with it, the dashboard's and autoscaler's metrics servers
# bind loopback too. No Prometheus exports: nothing scrapes them, and each node's agent would open a port.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_enable_metrics_collection": "0"}


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray on loopback; a running Ray is kept.

    Every worker process runs `hvd.runtime.worker_setup.setup_worker` first. Ray's info logs and Ray Data's
    progress bars (hundreds of redrawn lines a run) stay off unless `--verbose` on a terminal: each
    pipeline prints its own summary. A local Ray keeps Ray's default token authentication.
    """
    ray.data.DataContext.get_current().enable_progress_bars = verbose() and sys.stderr.isatty()
    os.environ.setdefault(FOOTER_READERS_ENV, FOOTER_READERS)  # read where this process plans a Parquet read
    quiet_logs()
    if ray.is_initialized():
        return
    level = logging.INFO if verbose() else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env(), logging_level=level)
        return
    watch_descendants()  # a killed pipeline leaves no Ray daemons behind
    # The daemons ray.init starts inherit LOCAL_RAY_ENV; this process read the one-machine switch when it
    # imported Ray, so it is set here too. Both only while ray.init runs: later Rays of this process (and its
    # subprocesses) start as they would have.
    with patch.dict(os.environ, LOCAL_RAY_ENV), patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address=LOOPBACK,
                 runtime_env=runtime_env(), logging_level=level)
