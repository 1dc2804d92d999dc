"""Progress lines for long loops (evaluation's encoding and scoring, a gallery index's encoding): work done of
the total, its rate and an ETA, as training's step lines give them, so a user at a terminal sees work move.

Quiet off a terminal: a job's log (`ray job submit`, a file, CI) keeps its results, not a stream of counters.
`HVD_PROGRESS=1` shows the lines anywhere (a log one watches), `HVD_PROGRESS=0` nowhere. They are `hvd` logger
records like every library line (`hvd.runtime.logs`), so they show where a command shows its lines, and the
terminal asked about is that stdout. Work in Ray workers says nothing: their stdout is a pipe to the driver,
which reports the results as they come back.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

PROGRESS_ENV = "HVD_PROGRESS"  # "1": progress lines even off a terminal; "0": never
STEPS = 20  # a line each 1/20 (5%) of the work ...
MIN_GAP_S = 2.0  # ... but none within 2 s of the start or the last line: short work stays silent
MAX_GAP_S = 30.0  # and one after 30 s without, however slowly the percentage moves

logger = logging.getLogger(__name__)


def shown() -> bool:
    """Whether progress lines show: `HVD_PROGRESS` when set to 0 or 1, else whether stdout is a terminal."""
    setting = os.environ.get(PROGRESS_ENV)
    if setting in ("0", "1"):
        return setting == "1"
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def duration_text(seconds: float) -> str:
    """`42 s`, `1.7 min`, `2.3 h`: a time at the precision that a wait is planned by."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def rate_text(per_s: float) -> str:
    return f"{per_s:,.1f}/s" if per_s < 10 else f"{per_s:,.0f}/s"


class Progress:
    """Counts `total` units of work as they are done and says how far it is, e.g.
    `encoding test videos 1,200/10,000 (85/s, ETA 1.7 min)`, then `encoding test videos: 10,000 in 2.0 min (83/s)`.

    The rate is the average since the start, so the ETA steadies as the work goes on. Work done within
    MIN_GAP_S says nothing at all. `clock`: seconds, monotonic (a test's fake clock).
    """

    def __init__(self, total: int, what: str, clock: Callable[[], float] = time.monotonic):
        self.total, self.what, self.clock = total, what, clock
        self.on = total > 0 and shown()
        self.done = 0
        self.started = self.last_line = clock()
        self.next_step = 1  # in 1/STEPS of the total: whole numbers, so 6/40 is a step of 5% as exactly as 2/40

    def advance(self, n: int) -> None:
        """`n` more units done; says so when a 5% step is crossed (or MAX_GAP_S passed), and when all are done."""
        self.done += n
        if not self.on:
            return
        now = self.clock()
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.done >= self.total:
            self.on = False  # the last line is said once
            if elapsed >= MIN_GAP_S:
                logger.info(f"{self.what}: {self.total:,} in {duration_text(elapsed)} ({rate_text(rate)})")
            return
        crossed = self.done * STEPS >= self.next_step * self.total
        if crossed:
            self.next_step = self.done * STEPS // self.total + 1
        since = now - self.last_line
        if (crossed and since >= MIN_GAP_S) or since >= MAX_GAP_S:
            self.last_line = now
            eta_s = (self.total - self.done) / rate
            logger.info(f"{self.what} {self.done:,}/{self.total:,} ({rate_text(rate)}, ETA {duration_text(eta_s)})")
