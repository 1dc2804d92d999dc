"""How the library's progress and warning lines reach a user: `logging` records under the `hvd` logger, shown
as plain lines on stdout by the command front (`hvd.cli`) and in every Ray worker (`hvd.runtime.worker_setup`).

Each module logs through `logging.getLogger(__name__)`: INFO for progress, WARNING for what a user should
look at. The lines read as they did when they were prints (a warning says "warning: "), and go to the
`sys.stdout` of the moment: pytest's capture sees them, and Ray forwards a worker's stdout to the driver's
terminal as it forwards a print.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "hvd"


class PlainLines(logging.Formatter):
    """The message alone; a warning or an error starts with its level, as `warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class CurrentStdout(logging.Handler):
    """Writes to `sys.stdout` as it is at each record, not as it was when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:
            self.handleError(record)


def show_logs() -> None:
    """Shows the `hvd` logger's INFO and above as plain stdout lines; once per process, however often called.

    The records stop there (no propagation): a root handler that Ray or a library installs would print
    each line a second time, on stderr.
    """
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(handler, CurrentStdout) for handler in logger.handlers):
        handler = CurrentStdout()
        handler.setFormatter(PlainLines())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
