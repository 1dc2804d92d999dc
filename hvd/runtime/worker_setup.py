"""What every Ray worker process of an HVD job sets up before its first task (Ray's `worker_process_setup_hook`)."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import time
import warnings

import ray

from hvd.runtime.logs import show_logs

# Ray Train's placement-group cleaner asks the state API every second whether the controller lives;
# with no dashboard (a local Ray) every ask fails and warns, hundreds of lines a run.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"  # logs "Reporting training result ..." per report
VERBOSE_ENV = "HVD_VERBOSE"  # "1": Ray's and MLflow's own info logs and Ray Data's progress bars back on
# Ray Data's Parquet reader starts this many footer-reading actors, a Python process each, for every read of a
# split, so every training epoch (32 by default, sized for object stores). A shard folder holds hundreds of files
# at most, on a local or shared disk: one actor reads their footers, and the first steps of an epoch no longer
# wait on dozens of process start-ups. Read where a read is planned (the driver, `ensure_ray` sets it) and in
# the job's workers; a value the user's environment sets is kept.
FOOTER_READERS_ENV, FOOTER_READERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def runtime_env() -> dict[str, object]:
    """The job's Ray runtime env: every worker runs `setup_worker` first and inherits the verbosity."""
    return {
        "worker_process_setup_hook": "hvd.runtime.worker_setup.setup_worker",
        "env_vars": {VERBOSE_ENV: "1" if verbose() else "0", FOOTER_READERS_ENV: os.environ.get(FOOTER_READERS_ENV, FOOTER_READERS)},
    }


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_logs() -> None:
    """Ray Data's and MLflow's info lines off the console, unless verbose; their log files keep everything.

    Call it after MLflow is imported (its import sets its own level); Ray Data configures its loggers once,
    on import, so its console handler is adjusted after importing it here.
    """
    if verbose():
        return
    import ray.data  # noqa: F401

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            handler.addFilter(DropMessages("Progress bars disabled"))  # off by choice, said once here: README
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    train_context = sys.modules.get(TRAIN_CONTEXT_MODULE)
    if train_context is not None:  # in a Ray Train worker: its per-report info lines, on a logger named by file
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*exclude_resources.* is deprecated")  # Ray's own internals


class OncePer(logging.Filter):
    """Lets a logger's first record through, then at most one every `interval_s`, saying how many it held back."""

    def __init__(self, interval_s: float):
        super().__init__()
        self.interval_s = interval_s
        self.last_s = -float("inf")
        self.held_back = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last_s < self.interval_s:
            self.held_back += 1
            return False
        if self.held_back:
            record.msg = f"{record.msg} ({self.held_back} more like this in the last {self.interval_s:.0f} s)"
        self.last_s, self.held_back = now, 0
        return True


def setup_worker() -> None:
    faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack, not one
    show_logs()  # progress lines (an epoch's loss) on the worker's stdout, which Ray forwards to the driver
    quiet_logs()
    # Ray's in-cluster helpers that look the cluster up (the placement-group cleaner's state queries) find
    # several when other Ray instances run on the machine, and die with a traceback: name ours.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).addFilter(OncePer(600.0))
