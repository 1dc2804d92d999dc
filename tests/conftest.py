"""Shared fixtures: an MLflow-URI guard for every test, one watched run of the training command, small real
H.264 files written with PyAV (sound and broken), the model tests' captions and clips, and a tiny registered
model beside a local Ray."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import ray
import torch
from training_command import WatchedRun, run_training_command

from hvd.config import ModelConfig, load_config
from hvd.data.synthetic import generate
from hvd.model import build_model, build_tokenizer
from hvd.registry.models import register_model
from hvd.registry.runs import finish_run, start_or_resume_run, tracking_uri
from hvd.runtime.logs import show_logs


@pytest.fixture(autouse=True, scope="session")
def _library_lines():
    """The library's progress and warning lines on stdout, as a command shows them, for tests that call it directly."""
    show_logs()


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """Each test starts without MLFLOW_TRACKING_URI and leaves none: `mlflow.set_tracking_uri` writes it."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def training_command(tmp_path_factory) -> WatchedRun:
    """The real training command, run once for the session and watched (see `training_command.py`)."""
    return run_training_command(tmp_path_factory.mktemp("command"))


def frame_level(index: int) -> int:
    """Grey level of frame `index` outside its marker: the frame's number, readable after lossy coding."""
    return 30 + 3 * index


def marked_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """`[T, H, W, 3]` frames: grey `frame_level(i)` with a white top-left quarter, so order and orientation show."""
    assert frame_level(num_frames - 1) < 230, "too many frames to tell apart by grey level"
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for index in range(num_frames):
        frames[index] = frame_level(index)
        frames[index, : height // 2, : width // 2] = 255
    return frames


def read_frame_number(frame: np.ndarray) -> int:
    """Inverse of `frame_level`, read from the bottom-right quarter of an upright frame."""
    height, width = frame.shape[:2]
    return round((float(frame[height // 2 :, width // 2 :].mean()) - 30) / 3)


def write_clip(
    path: Path,
    frames: np.ndarray,
    fps: int = 10,
    rotation: int | None = None,
    pts_ms: Sequence[int] | None = None,
    keyframe_every: int | None = None,
) -> Path:
    """H.264 MP4 (B-frames on, so decode order differs from presentation order).

    `rotation`: display-matrix rotation in degrees counter-clockwise, as phones write it; the stored
    frames are `frames` as given. `pts_ms`: presentation times in milliseconds for a variable frame rate.
    `keyframe_every`: frames between keyframes (the encoder's default: one keyframe for a short clip).
    """
    with av.open(str(path), mode="w") as container:  # the container format from the suffix
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "10", "threads": "1"}
        if keyframe_every is not None:
            stream.options |= {"g": str(keyframe_every), "keyint_min": str(keyframe_every), "sc_threshold": "0"}
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[index], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_wav(path: Path, seconds: float = 1.0, rate: int = 8000) -> Path:
    """Audio only: a container that opens fine but holds no video stream."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, int(seconds * rate)), np.int16), format="s16", layout="mono")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_broken_videos(folder: Path) -> dict[str, Path]:
    """One file per way a collection breaks, keyed by kind (tests map each to its quarantine reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    mp4 = write_clip(folder / "whole.mp4", marked_frames(30, 64, 64)).read_bytes()
    (folder / "cut_mp4.mp4").write_bytes(mp4[: len(mp4) // 2])  # cut before its index: unreadable
    # Matroska cut in half: decord decodes the first half as if it were all (noise makes the packets large).
    noisy = marked_frames(60, 64, 64) + np.random.default_rng(0).integers(0, 20, (60, 64, 64, 3), dtype=np.uint8)
    mkv = write_clip(folder / "whole.mkv", noisy).read_bytes()
    (folder / "cut_mkv.mkv").write_bytes(mkv[: len(mkv) // 2])
    (folder / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "directory.mp4").mkdir()
    (folder / "whole.mp4").unlink()
    (folder / "whole.mkv").unlink()
    return {
        "cut_mp4": folder / "cut_mp4.mp4",
        "cut_mkv": folder / "cut_mkv.mkv",
        "random": folder / "random.mp4",
        "empty": folder / "empty.mp4",
        "directory": folder / "directory.mp4",
        "audio_only": write_wav(folder / "audio_only.wav"),
        "missing": folder / "missing.mp4",
    }


@pytest.fixture
def clip_factory(tmp_path: Path) -> Callable[..., Path]:
    """`clip_factory(name, num_frames=20, height=64, width=64, **write_clip_kwargs)` -> a marked clip's path."""

    def make(name: str, num_frames: int = 20, height: int = 64, width: int = 64, **kwargs) -> Path:
        return write_clip(tmp_path / name, marked_frames(num_frames, height, width), **kwargs)

    return make


@pytest.fixture
def broken_videos(tmp_path: Path) -> dict[str, Path]:
    return write_broken_videos(tmp_path / "broken")


# The model tests' inputs: four captions, and four random clips of MODEL_FRAMES 64 px frames.
MODEL_CAPTIONS = ["a red square slides left", "a blue circle grows", "two green dots swap places", "a dog"]
MODEL_FRAMES = 6


@pytest.fixture(scope="module")
def tokens():
    return build_tokenizer(ModelConfig(), max_words=32)(MODEL_CAPTIONS)


@pytest.fixture(scope="module")
def frames():
    return torch.randn(len(MODEL_CAPTIONS), MODEL_FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny synthetic benchmark and a tiny (untrained) HVD model registered as `hvd` version 1, `champion`, in a
    SQLite store of its own; a local Ray for the module's jobs."""
    ray.init(num_cpus=2, include_dashboard=False)
    root = tmp_path_factory.mktemp("registered")
    cfg = load_config(
        None,
        [
            "synthetic.preset=tiny",
            f"synthetic.out={root}/bench",
            f"tracking.uri=sqlite:///{root}/mlflow.db",
            "run.name=tiny-train",
            f"train.storage_path={root}/ray",  # the run's driver lock, out of the checkout
            "model.pretrained=null",  # an untrained model is all these tests need
            f"eval.out={root}/eval",
            f"eval.cache={root}/cache",
            f"index.cache={root}/indexes",
        ],
    )
    manifest = generate(cfg.synthetic, progress=False)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run = start_or_resume_run(cfg, {})
    registered = register_model(cfg, run.run_id, model, {"val/t2v/R1": 12.5})
    name, version = registered.name, registered.version
    finish_run(tracking_uri(cfg), run.run_id)
    yield {
        "cfg": cfg,
        "root": root,
        "manifest": manifest,
        "run_id": run.run_id,
        "name": name,
        "version": version,
    }
    ray.shutdown()
