"""Decoders that crash their process or hang, standing in for native decoder failures no test file causes
reliably. A module of its own, light to import: decoder child processes load it."""

import os
import signal
import time
from pathlib import Path

from hvd.data.decode import FrameSpec, MissingVideoError, decode_clip


def misbehave(path: str, action: str):
    """Returns, raises, crashes its process or hangs, as `action` says."""
    if action == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "hang":
        time.sleep(3600)
    if action == "raise":
        raise MissingVideoError(path, "file not found")
    return f"decoded {path}"


def by_file_name(path: Path, spec: FrameSpec):
    """`decode_clip`, except that files named `crash*` crash the process and `hang*` hang it."""
    name = Path(path).name
    for action in ("crash", "hang"):
        if name.startswith(action):
            return misbehave(str(path), action)
    return decode_clip(path, spec)
