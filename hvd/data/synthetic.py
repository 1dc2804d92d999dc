"""A synthetic text-video benchmark of real H.264 files that every machine can make for itself.

Each clip shows a textured, drifting clutter background and distractor objects; during one event
window (`event_fraction` of the clip) a target object of a given colour and shape performs one motion.
Captions name colour, shape and motion, and videos come in confusable pairs (same object, other
motion; or same motion, other colour), so retrieval needs attributes *and* motion: what HVD's
text-guided frame selection (the event is brief) and patch compression (the object is small) claim to help.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from hvd.config import ConfigError, SyntheticConfig, check_section
from hvd.data.manifest import ManifestEntry, write_manifest

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 50),
    "blue": (30, 70, 235),
    "yellow": (240, 225, 30),
    "cyan": (30, 215, 225),
    "magenta": (215, 40, 205),
    "white": (250, 250, 250),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moves to the left", "slides left", "travels leftward", "drifts to the left side", "goes left"),
    "right": ("moves to the right", "slides right", "travels rightward", "drifts to the right side", "goes right"),
    "up": ("moves up", "rises", "floats upward", "travels to the top", "goes up"),
    "down": ("moves down", "falls", "sinks downward", "drops to the bottom", "goes down"),
    "grow": ("grows bigger", "expands", "gets larger", "increases in size", "swells up"),
    "shrink": ("shrinks", "gets smaller", "contracts", "decreases in size", "shrinks down"),
}
MOTIONS = tuple(MOTION_PHRASES)
SUBJECTS = ("a {colour} {shape}", "the {colour} {shape}", "one {colour} {shape}", "a {shape} coloured {colour}")

PRESETS: dict[str, dict[str, float]] = {
    "tiny": {"num_train": 24, "num_val": 8, "num_test": 8, "frame_size": 64, "duration_s": 2.0},
    "demo": {"num_train": 1000, "num_val": 100, "num_test": 200, "frame_size": 64, "duration_s": 3.0},
    "full": {"num_train": 4000, "num_val": 500, "num_test": 1000, "frame_size": 96, "duration_s": 4.0},
}
BACKGROUND_RANGE = (50, 150)  # grey levels: far from every object colour, so objects stay measurable


@dataclass(frozen=True)
class Settings:
    """The preset resolved with its overrides: everything that determines the benchmark's bytes."""

    seed: int
    num_train: int
    num_val: int
    num_test: int
    frame_size: int
    fps: int
    duration_s: float
    event_fraction: float
    entity_scale: float
    num_distractors: int
    train_captions: int

    @property
    def num_frames(self) -> int:
        return round(self.duration_s * self.fps)


@dataclass(frozen=True)
class ClipSpec:
    index: int
    video_id: str
    split: str
    colour: str
    shape: str
    motion: str


def resolve(cfg: SyntheticConfig) -> Settings:
    check_section("synthetic", cfg)
    preset = PRESETS[cfg.preset]
    pick = lambda name: getattr(cfg, name) if getattr(cfg, name) is not None else preset[name]  # noqa: E731
    settings = Settings(
        seed=cfg.seed,
        num_train=int(pick("num_train")),
        num_val=int(pick("num_val")),
        num_test=int(pick("num_test")),
        frame_size=int(pick("frame_size")),
        fps=cfg.fps,
        duration_s=float(pick("duration_s")),
        event_fraction=cfg.event_fraction,
        entity_scale=cfg.entity_scale,
        num_distractors=cfg.num_distractors,
        train_captions=cfg.train_captions,
    )
    if settings.num_frames < 4:
        raise ConfigError(
            f"bad value for 'synthetic.duration_s': {settings.duration_s} (at synthetic.fps={settings.fps} a clip "
            f"would have {settings.num_frames} frames; at least 4 are needed)"
        )
    return settings


def plan_clips(settings: Settings) -> list[ClipSpec]:
    """Attributes of every clip, drawn in confusable pairs so hard negatives always exist."""
    rng = np.random.default_rng([settings.seed, 0])
    splits = ["train"] * settings.num_train + ["val"] * settings.num_val + ["test"] * settings.num_test
    colours, specs = list(COLOURS), []
    base = None
    for index, split in enumerate(splits):
        first_of_pair = index % 2 == 0 or base is None or base.split != split
        if first_of_pair:
            colour, shape, motion = colours[rng.integers(8)], SHAPES[rng.integers(6)], MOTIONS[rng.integers(6)]
        elif rng.random() < 0.5:  # same object, another motion
            colour, shape = base.colour, base.shape
            motion = [m for m in MOTIONS if m != base.motion][rng.integers(5)]
        else:  # same motion, another colour
            shape, motion = SHAPES[rng.integers(6)], base.motion
            colour = [c for c in colours if c != base.colour][rng.integers(7)]
        spec = ClipSpec(index, f"synth{index:06d}", split, colour, shape, motion)
        base = spec if first_of_pair else None
        specs.append(spec)
    return specs


def captions_for(spec: ClipSpec, count: int, rng: np.random.Generator) -> list[str]:
    pairs = [(s, p) for s in SUBJECTS for p in MOTION_PHRASES[spec.motion]]
    chosen = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    return [
        (pairs[i][0].format(colour=spec.colour, shape=spec.shape) + " " + pairs[i][1]).capitalize()
        for i in chosen
    ]


def shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        return (dy >= -r) & (dy <= 0.75 * r) & (np.abs(dx) <= 0.65 * (dy + r))
    if shape == "cross":
        arm = 0.35 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey clutter texture twice the frame size: blurred noise plus random blocks."""
    big = 2 * size
    coarse = rng.uniform(*BACKGROUND_RANGE, size=(big // 8 + 1, big // 8 + 1))
    texture = np.kron(coarse, np.ones((8, 8)))[:big, :big]
    for _ in range(12):
        y, x = rng.integers(0, big - 4, size=2)
        h, w = rng.integers(2, max(3, size // 6), size=2)
        texture[y : y + h, x : x + w] = rng.uniform(*BACKGROUND_RANGE)
    texture += rng.normal(0, 6, size=texture.shape)
    return np.clip(texture, *BACKGROUND_RANGE)


def event_window(settings: Settings, rng: np.random.Generator) -> tuple[int, int]:
    """First and one-past-last frame of the event."""
    n = settings.num_frames
    length = min(n, max(2, round(settings.event_fraction * n)))
    start = int(rng.integers(0, n - length + 1))
    return start, start + length


def target_track(spec: ClipSpec, settings: Settings, rng: np.random.Generator, length: int) -> np.ndarray:
    """(cy, cx, r) of the target for each event frame."""
    size = settings.frame_size
    r0 = settings.entity_scale * size / 2
    p = np.linspace(0.0, 1.0, length)
    lo, hi = r0 * 1.1, size - r0 * 1.1
    fixed_y, fixed_x = rng.uniform(lo, hi, size=2)
    cy, cx, r = np.full(length, fixed_y), np.full(length, fixed_x), np.full(length, r0)
    if spec.motion == "left":
        cx = hi - (hi - lo) * p
    elif spec.motion == "right":
        cx = lo + (hi - lo) * p
    elif spec.motion == "up":
        cy = hi - (hi - lo) * p
    elif spec.motion == "down":
        cy = lo + (hi - lo) * p
    elif spec.motion == "grow":
        r = r0 * (0.45 + 0.75 * p)
    elif spec.motion == "shrink":
        r = r0 * (1.2 - 0.75 * p)
    return np.stack([cy, cx, r], axis=1)


def render_clip(spec: ClipSpec, settings: Settings) -> tuple[np.ndarray, tuple[int, int]]:
    """Frames `[T, H, W, 3]` uint8 and the event window; a pure function of (spec, settings)."""
    rng = np.random.default_rng([settings.seed, 1, spec.index])
    size, n = settings.frame_size, settings.num_frames
    texture = _background(size, rng)
    drift = rng.uniform(-1.5, 1.5, size=2)  # background pixels per frame
    start, end = event_window(settings, rng)
    track = target_track(spec, settings, rng, end - start)
    others = [c for c in COLOURS if c != spec.colour]
    distractors = [
        (
            COLOURS[others[i]],
            SHAPES[rng.integers(len(SHAPES))],
            rng.uniform(0.2 * size, 0.8 * size, size=2),  # home position
            rng.uniform(0, 2 * np.pi),  # wobble phase
        )
        for i in rng.choice(len(others), size=settings.num_distractors, replace=False)
    ]
    distractor_r = 0.7 * settings.entity_scale * size / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for t in range(n):
        oy, ox = (np.array([size / 2, size / 2]) + drift * t).astype(int) % size
        frame = np.repeat(texture[oy : oy + size, ox : ox + size, None], 3, axis=2)
        for colour, shape, home, phase in distractors:  # wobble in place: no net motion
            wobble = 0.04 * size * np.array([np.sin(0.7 * t + phase), np.cos(0.5 * t + phase)])
            cy, cx = home + wobble
            frame[shape_mask(shape, yy, xx, cy, cx, distractor_r)] = colour
        if start <= t < end:
            cy, cx, r = track[t - start]
            frame[shape_mask(spec.shape, yy, xx, cy, cx, r)] = COLOURS[spec.colour]
        frames[t] = frame.astype(np.uint8)
    return frames, (start, end)


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """H.264 in MP4 that is a pure function of the frames.

    Constant quantiser and one thread: x264's CRF rate control (lookahead, mb-tree) was measured here
    to give different bytes for the same frames from run to run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "18", "preset": "veryfast", "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _make_clip(job: tuple[ClipSpec, Settings, str]) -> ManifestEntry:
    spec, settings, out = job
    frames, (start, end) = render_clip(spec, settings)
    relative = f"videos/{spec.video_id}.mp4"
    write_mp4(frames, Path(out) / relative, settings.fps)
    count = settings.train_captions if spec.split == "train" else 1
    caption_rng = np.random.default_rng([settings.seed, 2, spec.index])
    return ManifestEntry(
        video_id=spec.video_id,
        path=relative,
        captions=captions_for(spec, count, caption_rng),
        split=spec.split,
        extra={
            "attributes": {"colour": spec.colour, "shape": spec.shape, "motion": spec.motion},
            "event": {"start_s": start / settings.fps, "end_s": end / settings.fps},
        },
    )


def generate(cfg: SyntheticConfig, progress: bool = True, force: bool = False) -> Path:
    """Write `videos/*.mp4` and `manifest.jsonl` under `cfg.out`; return the manifest path.

    A folder already holding a complete benchmark with the same settings is reused as it is: the
    manifest is written last, so an interrupted generation is redone rather than trusted.
    """
    settings = resolve(cfg)
    out = Path(cfg.out)
    manifest, stamp = out / "manifest.jsonl", out / "synthetic.json"
    if not force and manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == asdict(settings):
        return manifest
    manifest.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    jobs = [(spec, settings, str(out)) for spec in plan_clips(settings)]
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=f"synthetic {cfg.preset}", unit="clip", disable=not progress)
    if workers == 1:
        entries = []
        for job in jobs:
            entries.append(_make_clip(job))
            bar.update()
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            entries = []
            for entry in pool.imap(_make_clip, jobs, chunksize=8):
                entries.append(entry)
                bar.update()
    bar.close()
    return write_manifest(entries, manifest)
