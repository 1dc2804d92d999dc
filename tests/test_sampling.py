"""Frame selection: the same frames the reference implementations pick, and sane picks where they break."""

import numpy as np
import pytest

from hvd.data.sampling import fps_indices, sample_indices, uniform_indices


def xpool_uniform(vlen: int, num_frames: int) -> list[int]:
    """X-Pool's `sample_frames_from_video(..., sample='uniform')`, for clips at least num_frames long."""
    intervals = np.linspace(start=0, stop=vlen, num=num_frames + 1).astype(int)
    ranges = [(interv, intervals[i + 1] - 1) for i, interv in enumerate(intervals[:-1])]
    return [(x[0] + x[1]) // 2 for x in ranges]


def clip4clip_fps(frame_count: int, fps: int, max_frames: int) -> list[int]:
    """CLIP4Clip's RawVideoExtractor at 1 frame/s, then its `slice_framepos=2` linspace cut."""
    total_duration = (frame_count + fps - 1) // fps
    picks = [sec * fps for sec in range(total_duration + 1) if sec * fps < frame_count]
    if len(picks) > max_frames:
        picks = [picks[i] for i in np.linspace(0, len(picks) - 1, num=max_frames, dtype=int)]
    return picks


@pytest.mark.parametrize("vlen", [12, 13, 20, 37, 100, 301, 1000])
@pytest.mark.parametrize("num_frames", [1, 8, 12])
def test_uniform_matches_xpool(vlen, num_frames):
    assert uniform_indices(vlen, num_frames).tolist() == xpool_uniform(vlen, num_frames)


@pytest.mark.parametrize("vlen", [1, 2, 5, 11, 12])
def test_uniform_on_short_clips_takes_every_frame_once(vlen):
    assert uniform_indices(vlen, 12).tolist() == list(range(vlen))  # the row pads the rest, masked


@pytest.mark.parametrize(("frame_count", "fps"), [(300, 10), (905, 30), (25, 25), (1000, 24)])
def test_fps_on_constant_rate_matches_clip4clip(frame_count, fps):
    timestamps = np.arange(frame_count) / fps
    expected = clip4clip_fps(frame_count, fps, max_frames=12)
    picks = fps_indices(timestamps, 12)
    assert picks.tolist() == expected  # fewer than 12: CLIP4Clip zero-pads the rest, and so does the row


def test_fps_follows_timestamps_on_variable_frame_rate():
    #            0    1    2    3    4     5    6
    timestamps = [0.0, 0.4, 0.9, 1.7, 2.05, 3.5, 3.9]
    # on screen at t = 0, 1, 2, 3 s: frames 0, 2, 3, 4 (a constant-rate index would say 0, 1.75, ...)
    assert fps_indices(np.array(timestamps), 4).tolist() == [0, 2, 3, 4]


def test_fps_counts_time_from_the_first_frame():
    timestamps = 0.5 + np.arange(40) / 10  # stream starts at 0.5 s
    assert fps_indices(timestamps, 4).tolist() == [0, 10, 20, 30]


def test_fps_on_a_short_clip_takes_each_second_once():
    picks = fps_indices(np.arange(25) / 10, 6)  # 2.5 s: seconds 0, 1, 2
    assert picks.tolist() == [0, 10, 20]


def test_fps_takes_a_frame_on_screen_for_several_seconds_once():
    timestamps = np.array([0.0, 0.5, 2.9, 3.7])  # frame 1 is on screen at 1 and 2 s
    assert fps_indices(timestamps, 12).tolist() == [0, 1, 2]


def test_dispatch_and_bad_input():
    timestamps = np.arange(50) / 10
    assert sample_indices("uniform", timestamps, 5).tolist() == uniform_indices(50, 5).tolist()
    assert sample_indices("fps", timestamps, 5).tolist() == fps_indices(timestamps, 5).tolist()
    with pytest.raises(ValueError, match="unknown sample mode 'bogus'"):
        sample_indices("bogus", timestamps, 5)
    with pytest.raises(ValueError):
        uniform_indices(0, 12)
    with pytest.raises(ValueError):
        fps_indices(np.array([]), 12)
