"""SIGTERM and SIGINT as an exception in the driver, so that a stopped command closes what it opened.

By default SIGTERM ends Python at once: no `finally` runs, and an MLflow run stays RUNNING forever.
`ray.init` installs its own SIGTERM handler behind a C++ one that first prints a stack dump, and Ray
Train's `fit` its own SIGINT handler; `stop_on_signals` installs ours again after them.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the stop signals this process got, first first


def _raise(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    for sig in SIGNALS:  # a second signal ends the process at once, as without us
        signal.signal(sig, signal.SIG_DFL)
    raise KeyboardInterrupt(signal.Signals(signum).name)  # Ray's `get` re-raises any exception as this type


def stop_on_signals() -> None:
    """From now on the first SIGTERM or SIGINT raises KeyboardInterrupt in the main thread; elsewhere a no-op,
    since only the main thread may set handlers."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _raise)


def received_signal() -> int | None:
    """The stop signal that `stop_on_signals`' handler turned into an exception, if one came."""
    return _received[0] if _received else None


def stopped(err: BaseException) -> bool:
    """Whether `err` is how a signal stops this process: ours or Python's KeyboardInterrupt, or the SystemExit
    that Ray's handlers raise."""
    return isinstance(err, (KeyboardInterrupt, SystemExit))
