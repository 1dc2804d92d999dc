"""What every Ray worker process of an HVD job sets up before its first task (Ray's `worker_process_setup_hook`)."""

from __future__ import annotations

import faulthandler
import logging
import os
import time

import ray

# Ray Train's placement-group cleaner asks the state API every second whether the controller lives;
# with no dashboard (a local Ray) every ask fails and warns, hundreds of lines a run.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
RUNTIME_ENV = {"worker_process_setup_hook": "hvd.worker_setup.setup_worker"}


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
    # Ray's in-cluster helpers that look the cluster up (the placement-group cleaner's state queries) find
    # several when other Ray instances run on the machine, and die with a traceback: name ours.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).addFilter(OncePer(600.0))
