"""Decoders that crash their process, hang or allocate without bound, standing in for native decoder failures
no test file causes reliably. A module of its own, light to import: decoder child processes load it."""

import os
import signal
import time
from pathlib import Path

import numpy as np

from hvd.data.decode import FrameSpec, MissingVideoError, VideoLimits, decode_clip

HOG_BYTES = 8 << 30  # what a `hog` call reserves; never touched, so harmless without a limit


def misbehave(path: str, action: str):
    """Returns, raises, crashes its process, hangs or allocates past any memory limit, as `action` says."""
    if action == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "hang":
        time.sleep(3600)
    if action == "raise":
        raise MissingVideoError(path, "file not found")
    if action == "hog":
        return f"reserved {np.empty(HOG_BYTES, np.uint8).nbytes} bytes for {path}"
    return f"decoded {path}"


def by_file_name(path: Path, spec: FrameSpec, limits: VideoLimits):
    """`decode_clip`, except that files named `crash*`, `hang*` or `hog*` crash, hang or outgrow it."""
    name = Path(path).name
    for action in ("crash", "hang", "hog"):
        if name.startswith(action):
            return misbehave(str(path), action)
    return decode_clip(path, spec, limits)
