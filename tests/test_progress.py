"""Progress lines of long loops (`hvd.runtime.progress`): their cadence, their ETA, and when they show."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from hvd.config import ModelConfig
from hvd.eval.encode import evaluate_split
from hvd.model import build_model, build_tokenizer
from hvd.runtime import progress as progress_module
from hvd.runtime.progress import PROGRESS_ENV, Progress, duration_text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def count(stream: io.StringIO, total: int, step_s: float, what: str = "counting") -> list[str]:
    """`total` units done one at a time, `step_s` apart on a fake clock, with stdout on `stream`: the lines."""
    clock = FakeClock()
    with contextlib.redirect_stdout(stream):
        progress = Progress(total, what, clock=clock)
        for _ in range(total):
            clock.now += step_s
            progress.advance(1)
    return stream.getvalue().splitlines()


def test_a_line_each_five_percent_with_rate_and_eta_then_the_total_time(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    lines = count(Terminal(), 100, 1.0)
    assert len(lines) == 20  # 5%, 10%, ... 95%, then done
    assert lines[0] == "counting 5/100 (1.0/s, ETA 1.6 min)"  # 95 left at 1 a second
    assert lines[9] == "counting 50/100 (1.0/s, ETA 50 s)"
    assert lines[-1] == "counting: 100 in 1.7 min (1.0/s)"


def test_short_work_says_nothing_and_slow_work_speaks_every_30_s(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert count(Terminal(), 1000, 0.001) == []  # one second in all: no line, not even the last
    slow = count(Terminal(), 40, 10.0, "indexing")  # 2.5% each 10 s: a line each second unit, 19 and the last
    assert len(slow) == 20 and slow[0] == "indexing 2/40 (0.1/s, ETA 6.3 min)"
    crawl = count(Terminal(), 2000, 7.0)[:3]  # 5% takes 12 min: a line after 30 s without one, each 5th unit
    assert crawl == ["counting 5/2,000 (0.1/s, ETA 3.9 h)", "counting 10/2,000 (0.1/s, ETA 3.9 h)",
                     "counting 15/2,000 (0.1/s, ETA 3.9 h)"]


def test_quiet_off_a_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert count(io.StringIO(), 100, 1.0) == []
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert len(count(io.StringIO(), 100, 1.0)) == 20
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert count(Terminal(), 100, 1.0) == []


def test_durations_read_in_the_unit_a_wait_is_planned_in():
    assert [duration_text(s) for s in (0.4, 59, 60, 102, 3599, 3600, 8280)] == [
        "0 s", "59 s", "1.0 min", "1.7 min", "60.0 min", "1.0 h", "2.3 h"]


def raw_rows(count: int, size: int, frames: int) -> pa.Table:
    """Shard rows (raw-codec frames) of `count` random videos, two captions each."""
    rng = np.random.default_rng(0)
    return pa.table({
        "video_id": [f"video{i}" for i in range(count)],
        "frames": [[rng.integers(0, 256, (size, size, 3), dtype=np.uint8).tobytes() for _ in range(frames)]
                   for _ in range(count)],
        "frame_size": [size] * count,
        "frame_codec": ["raw"] * count,
        "num_frames": [frames] * count,
        "valid_frames": [frames] * count,
        "captions": [[f"a clip number {i}", f"another caption {i}"] for i in range(count)],
    })


def test_evaluation_forced_on_reports_encoding_and_scoring(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    monkeypatch.setattr(progress_module, "MIN_GAP_S", 0.0)  # the tiny split takes well under 2 s
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg).eval()
    table = raw_rows(4, model.image_size, 2)
    metrics = evaluate_split(model, table, build_tokenizer(cfg, 16), batch_size=1)
    assert 0 <= metrics["t2v/R1"] <= 100
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines if line.startswith("encoding videos ")] == [
        "encoding videos 1/4", "encoding videos 2/4", "encoding videos 3/4"]
    assert any(line.startswith("encoding videos: 4 in ") for line in lines)
    assert any(line.startswith("encoding captions 7/8 (") for line in lines)
    assert any(line.startswith("scoring caption-video pairs: 32 in ") for line in lines)


@pytest.mark.parametrize("total", [0, 3])
def test_counting_goes_on_when_quiet(monkeypatch, total):
    monkeypatch.setenv(PROGRESS_ENV, "0")
    progress = Progress(total, "counting")
    progress.advance(total)
    assert progress.done == total and not progress.on
