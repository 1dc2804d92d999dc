"""Which source frames a clip keeps: the two schemes text-video retrieval papers train with.

Both return at most `num_frames` distinct indices in presentation order. A clip with fewer distinct
frames gets fewer indices and its shard row is padded with blank frames that a mask marks (`valid_frames`),
as CLIP4Clip zero-pads and masks: repeating frames, as X-Pool does, would let FFSM keep two copies of one
frame and weight it twice in every mean.
"""

from __future__ import annotations

import numpy as np

from hvd.config import CHOICES

SAMPLE_MODES = CHOICES["data.sample_mode"]


def uniform_indices(num_source: int, num_frames: int) -> np.ndarray:
    """The middle frame of each of `num_frames` equal segments (X-Pool's `uniform`); every frame of a
    clip with fewer frames than segments."""
    if num_source < 1 or num_frames < 1:
        raise ValueError(f"need at least one source frame and one sample, got {num_source} and {num_frames}")
    if num_source <= num_frames:
        return np.arange(num_source)
    edges = np.linspace(0, num_source, num_frames + 1).astype(np.int64)
    starts = edges[:-1]
    ends = np.maximum(starts, edges[1:] - 1)
    return (starts + ends) // 2


def fps_indices(timestamps_s: np.ndarray, num_frames: int, rate: float = 1.0) -> np.ndarray:
    """The frame on screen at every `1/rate` seconds (CLIP4Clip's 1 fps), thinned by linspace to `num_frames`;
    a clip shorter than `num_frames / rate` seconds gets fewer indices.

    Times come from the frames' own presentation timestamps, so variable frame rate clips are sampled
    at the right moments; CLIP4Clip's `second * fps` index assumes a constant rate.
    """
    timestamps_s = np.asarray(timestamps_s, dtype=np.float64)
    if timestamps_s.size < 1 or num_frames < 1:
        raise ValueError(f"need at least one source frame and one sample, got {timestamps_s.size} and {num_frames}")
    times = np.arange(timestamps_s[0], timestamps_s[-1] + 1e-9, 1.0 / rate)
    on_screen = np.searchsorted(timestamps_s, times + 1e-9, side="right") - 1
    if on_screen.size > num_frames:
        on_screen = on_screen[np.linspace(0, on_screen.size - 1, num_frames).astype(np.int64)]
    return np.unique(on_screen)  # a frame on screen for several seconds is taken once


def sample_indices(mode: str, timestamps_s: np.ndarray, num_frames: int) -> np.ndarray:
    """Indices into the clip's frames for `mode`; `timestamps_s` holds every frame's start time."""
    if mode == "uniform":
        return uniform_indices(len(timestamps_s), num_frames)
    if mode == "fps":
        return fps_indices(timestamps_s, num_frames)
    raise ValueError(f"unknown sample mode {mode!r} (choose one of {', '.join(SAMPLE_MODES)})")
