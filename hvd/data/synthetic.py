"""A synthetic text-video benchmark of real H.264 files that every machine can make for itself.

Each clip shows a textured, drifting clutter background and distractor objects; during one event
window (`event_fraction` of the clip) a target object appears. Captions name what any still of the event
shows: the target's size, fill, colour, shape and where it is ("a small striped red circle in the top left
corner"), so an order-free model (mean pooling, HVD) can tell every caption apart; videos come in
confusable pairs that differ in one attribute. The event is brief and the object small: what HVD's
text-guided frame selection and patch compression claim to help. `synthetic.temporal=true` makes the
target move during the event instead and names the motion ("... slides left"), for temporal heads: left
vs right cannot be told from frames taken as a set.

The manifest records the ground truth no caption says (`event`: the event's frames and the target's box in
each), which prepare carries into the shards per sampled frame and evaluation scores the heads' frame
selection and patch clustering against (`hvd.eval.mechanism`).

`oracle.json` beside the manifest holds each split's ceiling: the expected t2v R@1 of an ideal model that
sees every named attribute and nothing else (ties between videos whose captions name the same
attributes broken at random).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
from tqdm import tqdm

from hvd.config import ConfigError, SyntheticConfig, check_section
from hvd.data.folders import exclusive
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
    "pink": (250, 150, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar", "semicircle")
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moves to the left", "slides left", "travels leftward", "drifts to the left side", "goes left"),
    "right": ("moves to the right", "slides right", "travels rightward", "drifts to the right side", "goes right"),
    "up": ("moves up", "rises", "floats upward", "travels to the top", "goes up"),
    "down": ("moves down", "falls", "sinks downward", "drops to the bottom", "goes down"),
    "grow": ("grows bigger", "expands", "gets larger", "increases in size", "swells up"),
    "shrink": ("shrinks", "gets smaller", "contracts", "decreases in size", "shrinks down"),
}
MOTIONS = tuple(MOTION_PHRASES)
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {  # radius factor on entity_scale, and its words
    "small": (0.75, ("small", "little")),
    "large": (1.3, ("large", "big")),
}
FILLS: dict[str, tuple[str, ...]] = {"solid": ("solid", "filled"), "striped": ("striped",), "hollow": ("hollow", "outlined")}
REGIONS: dict[str, tuple[tuple[float, float], tuple[str, ...]]] = {  # centre (y, x) as a share of the side
    "top left": ((0.2, 0.2), ("in the top left corner", "at the top left")),
    "top": ((0.2, 0.5), ("at the top", "near the top edge")),
    "top right": ((0.2, 0.8), ("in the top right corner", "at the top right")),
    "left": ((0.5, 0.2), ("on the left", "at the left side")),
    "centre": ((0.5, 0.5), ("in the centre", "in the middle")),
    "right": ((0.5, 0.8), ("on the right", "at the right side")),
    "bottom left": ((0.8, 0.2), ("in the bottom left corner", "at the bottom left")),
    "bottom": ((0.8, 0.5), ("at the bottom", "near the bottom edge")),
    "bottom right": ((0.8, 0.8), ("in the bottom right corner", "at the bottom right")),
}
TEMPLATES = (
    "a {size} {fill} {colour} {shape} {where}",
    "{where} there is a {size} {fill} {colour} {shape}",
    "a {fill} {colour} {shape}, {size}, appears {where}",
    "the {size} {colour} {shape} {where} is {fill}",
    "one {size} {fill} {shape} coloured {colour} {where}",
)

PRESETS: dict[str, dict[str, float]] = {
    "tiny": {"num_train": 24, "num_val": 8, "num_test": 8, "frame_size": 64, "duration_s": 2.0, "fps": 10},
    "demo": {"num_train": 1000, "num_val": 100, "num_test": 200, "frame_size": 64, "duration_s": 3.0, "fps": 10},
    "full": {"num_train": 4000, "num_val": 500, "num_test": 1000, "frame_size": 96, "duration_s": 4.0, "fps": 10},
    # Clips as long as real ones, with keyframes as sparse: where sampling 12 frames must not decode them all.
    "long": {"num_train": 32, "num_val": 8, "num_test": 8, "frame_size": 224, "duration_s": 40.0, "fps": 30,
             "keyframe_s": 2.0},
}
ORACLE_FILE = "oracle.json"
# Bumped when the same settings give other files or manifest fields: a benchmark made before is made again.
# 2: the manifest's `event` records the event's frames and the target's box in each.
GENERATOR_VERSION = 2
T = TypeVar("T")
R = TypeVar("R")
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
    temporal: bool = False
    keyframe_s: float = 0.0  # seconds between keyframes; 0: the encoder's default (one per 250 frames)

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
    size: str
    fill: str
    region: str
    motion: str | None  # with `temporal` only

    def attributes(self) -> dict[str, str]:
        """What the captions name: the key two videos must differ in to be told apart."""
        names = {"colour": self.colour, "shape": self.shape, "size": self.size, "fill": self.fill, "region": self.region}
        return names if self.motion is None else {**names, "motion": self.motion}


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
        fps=int(pick("fps")),
        duration_s=float(pick("duration_s")),
        event_fraction=cfg.event_fraction,
        entity_scale=cfg.entity_scale,
        num_distractors=cfg.num_distractors,
        train_captions=cfg.train_captions,
        temporal=cfg.temporal,
        keyframe_s=float(preset.get("keyframe_s", 0.0)),
    )
    if settings.num_frames < 4:
        raise ConfigError(
            f"bad value for 'synthetic.duration_s': {settings.duration_s} (at synthetic.fps={settings.fps} a clip "
            f"would have {settings.num_frames} frames; at least 4 are needed)"
        )
    return settings


ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "fill": tuple(FILLS), "region": tuple(REGIONS),
}


def plan_clips(settings: Settings) -> list[ClipSpec]:
    """Attributes of every clip, drawn in confusable pairs (the second differs from the first in one
    named attribute) so hard negatives always exist."""
    rng = np.random.default_rng([settings.seed, 0])
    splits = ["train"] * settings.num_train + ["val"] * settings.num_val + ["test"] * settings.num_test
    choices = {**ATTRIBUTES, **({"motion": MOTIONS} if settings.temporal else {})}
    specs: list[ClipSpec] = []
    base: dict[str, str] | None = None
    for index, split in enumerate(splits):
        if index % 2 == 0 or base is None or specs[-1].split != split:
            drawn = {key: values[rng.integers(len(values))] for key, values in choices.items()}
            base = drawn
        else:  # the pair's second clip: one attribute changed
            key = list(choices)[rng.integers(len(choices))]
            others = [v for v in choices[key] if v != base[key]]
            drawn = {**base, key: others[rng.integers(len(others))]}
            base = None
        specs.append(ClipSpec(index, f"synth{index:06d}", split, **{"motion": None, **drawn}))
    return specs


def captions_for(spec: ClipSpec, count: int, rng: np.random.Generator) -> list[str]:
    """`count` different phrasings of the same attributes (templates and synonyms)."""
    captions: list[str] = []
    for _ in range(100 * count):
        if len(captions) == count:
            break
        words = {
            "size": SIZES[spec.size][1][rng.integers(len(SIZES[spec.size][1]))],
            "fill": FILLS[spec.fill][rng.integers(len(FILLS[spec.fill]))],
            "where": REGIONS[spec.region][1][rng.integers(2)],
            "colour": spec.colour,
            "shape": spec.shape,
        }
        text = TEMPLATES[rng.integers(len(TEMPLATES))].format(**words)
        if spec.motion is not None:
            phrases = MOTION_PHRASES[spec.motion]
            text = f"{text} {phrases[rng.integers(len(phrases))]}"
        text = text[0].upper() + text[1:]
        if text not in captions:
            captions.append(text)
    return captions


def oracle_ceiling(specs: list[ClipSpec], settings: Settings) -> dict[str, float]:
    """Per split, the expected t2v R@1 (percent) of a model that sees exactly the named attributes:
    each caption's video ties with the others whose captions name the same attributes."""
    ceiling = {}
    for split in ("train", "val", "test"):
        keys = [tuple(sorted(spec.attributes().items())) for spec in specs if spec.split == split]
        if not keys:
            continue
        count = Counter(keys)
        captions = settings.train_captions if split == "train" else 1
        ceiling[split] = round(100 * sum(captions / count[key] for key in keys) / (captions * len(keys)), 2)
    return ceiling


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
    if shape == "bar":
        return (np.abs(dx) <= r) & (np.abs(dy) <= 0.4 * r)
    if shape == "semicircle":
        return (dx * dx + dy * dy <= r * r) & (dy >= -0.15 * r)
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
    """(cy, cx, r) of the target for each event frame: still in its region (a slight wobble, as the
    distractors), or, with `temporal`, performing its motion."""
    size = settings.frame_size
    r0 = settings.entity_scale * size / 2 * SIZES[spec.size][0]
    (share_y, share_x), _ = REGIONS[spec.region]
    jitter = rng.uniform(-0.05, 0.05, size=2) * size
    home_y, home_x = np.clip(np.array([share_y, share_x]) * size + jitter, r0, size - r0)
    t = np.arange(length)
    cy = home_y + 0.02 * size * np.sin(0.7 * t)
    cx = home_x + 0.02 * size * np.cos(0.5 * t)
    r = np.full(length, r0)
    if spec.motion is not None:
        p = np.linspace(0.0, 1.0, length)
        lo, hi = r0 * 1.1, size - r0 * 1.1
        travel = {"left": (None, hi - (hi - lo) * p), "right": (None, lo + (hi - lo) * p),
                  "up": (hi - (hi - lo) * p, None), "down": (lo + (hi - lo) * p, None)}
        if spec.motion in travel:
            new_y, new_x = travel[spec.motion]
            cy, cx = (cy if new_y is None else new_y), (cx if new_x is None else new_x)
        elif spec.motion == "grow":
            r = r0 * (0.45 + 0.75 * p)
        elif spec.motion == "shrink":
            r = r0 * (1.2 - 0.75 * p)
    return np.stack([cy, cx, r], axis=1)


def fill_mask(fill: str, mask: np.ndarray, yy: np.ndarray, shape_edge: np.ndarray) -> np.ndarray:
    """The painted part of a shape: all of it, every other pair of rows (striped), or its rim (hollow)."""
    if fill == "striped":
        return mask & ((yy.astype(int) // 2) % 2 == 0)
    if fill == "hollow":
        return mask & ~shape_edge
    return mask


Distractor = tuple[tuple[int, int, int], str, np.ndarray, float]  # colour, shape, home (y, x), wobble phase


def _distractors(spec: ClipSpec, settings: Settings, rng: np.random.Generator) -> list[Distractor]:
    """Objects in every other colour than the target's, each wobbling in place."""
    size = settings.frame_size
    others = [c for c in COLOURS if c != spec.colour]
    return [
        (COLOURS[others[i]], SHAPES[rng.integers(len(SHAPES))], rng.uniform(0.2 * size, 0.8 * size, size=2),
         rng.uniform(0, 2 * np.pi))
        for i in rng.choice(len(others), size=settings.num_distractors, replace=False)
    ]


def draw_frame(
    spec: ClipSpec, settings: Settings, texture: np.ndarray, offset: np.ndarray, distractors: list[Distractor],
    t: int, target: np.ndarray | None,
) -> np.ndarray:
    """One [H, W, 3] uint8 frame: the background at `offset`, the distractors at time `t`, and the target
    at (cy, cx, r) when it is visible."""
    size = settings.frame_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    oy, ox = offset.astype(int) % size
    frame = np.repeat(texture[oy : oy + size, ox : ox + size, None], 3, axis=2)
    distractor_r = 0.7 * settings.entity_scale * size / 2
    for colour, shape, home, phase in distractors:  # wobble in place: no net motion
        wobble = 0.04 * size * np.array([np.sin(0.7 * t + phase), np.cos(0.5 * t + phase)])
        cy, cx = home + wobble
        frame[shape_mask(shape, yy, xx, cy, cx, distractor_r)] = colour
    if target is not None:
        cy, cx, r = target
        mask = shape_mask(spec.shape, yy, xx, cy, cx, r)
        inner = shape_mask(spec.shape, yy, xx, cy, cx, max(r - 2.5, 0.3 * r))  # a hollow shape's inside
        frame[fill_mask(spec.fill, mask, yy, inner)] = COLOURS[spec.colour]
    return frame.astype(np.uint8)


def target_box(spec: ClipSpec, settings: Settings, target: np.ndarray) -> list[float]:
    """The target's bounding box (x0, y0, x1, y1) as shares of the frame's side, pixel edges included: where
    the mechanism metrics look for its patches."""
    size = settings.frame_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rows, cols = np.nonzero(shape_mask(spec.shape, yy, xx, *target))
    if rows.size == 0:  # smaller than a pixel: the pixel under its centre
        rows, cols = np.clip([round(float(target[0]))], 0, size - 1), np.clip([round(float(target[1]))], 0, size - 1)
    return [round(float(v) / size, 4) for v in (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)]


@dataclass(frozen=True)
class GroundTruth:
    """What a clip shows that no caption says: the event's frames [start, end) and the target's box in each."""

    start: int
    end: int
    boxes: list[list[float]]  # (x0, y0, x1, y1) shares of the side, one per event frame

    def record(self, fps: int) -> dict[str, Any]:
        """The manifest's `event` field."""
        return {"start_s": self.start / fps, "end_s": self.end / fps, "start_frame": self.start,
                "end_frame": self.end, "boxes": self.boxes}


def render_clip(spec: ClipSpec, settings: Settings) -> tuple[np.ndarray, GroundTruth]:
    """Frames `[T, H, W, 3]` uint8 and where the event and target are; a pure function of (spec, settings)."""
    rng = np.random.default_rng([settings.seed, 1, spec.index])
    size, n = settings.frame_size, settings.num_frames
    texture = _background(size, rng)
    drift = rng.uniform(-1.5, 1.5, size=2)  # background pixels per frame
    start, end = event_window(settings, rng)
    track = target_track(spec, settings, rng, end - start)
    distractors = _distractors(spec, settings, rng)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for t in range(n):
        target = track[t - start] if start <= t < end else None
        frames[t] = draw_frame(spec, settings, texture, np.array([size / 2, size / 2]) + drift * t, distractors, t, target)
    return frames, GroundTruth(start, end, [target_box(spec, settings, target) for target in track])


def render_still(spec: ClipSpec, settings: Settings, seed: int) -> np.ndarray:
    """One [H, W, 3] frame of the same world with the target visible: what the warm start learns from."""
    rng = np.random.default_rng([settings.seed, 3, seed, spec.index])
    size = settings.frame_size
    texture = _background(size, rng)
    t = int(rng.integers(0, 1000))
    return draw_frame(spec, settings, texture, rng.uniform(0, size, size=2), _distractors(spec, settings, rng), t,
                      target_track(spec, settings, rng, 1)[0])


def write_mp4(frames: np.ndarray, path: Path, fps: int, keyframe_s: float = 0.0) -> None:
    """H.264 in MP4 that is a pure function of the frames, a keyframe every `keyframe_s` seconds when set.

    Constant quantiser and one thread: x264's CRF rate control (lookahead, mb-tree) was measured here
    to give different bytes for the same frames from run to run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "18", "preset": "veryfast", "threads": "1"}
        if keyframe_s:  # a fixed interval, no extra keyframes at scene cuts
            interval = str(max(1, round(keyframe_s * fps)))
            stream.options |= {"g": interval, "keyint_min": interval, "sc_threshold": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def in_processes(fn: Callable[[T], R], jobs: list[T], workers: int, chunksize: int = 1) -> Iterator[R]:
    """`fn` over `jobs`, results in order, in `workers` spawned processes (0: one per CPU; 1: this process)."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield from map(fn, jobs)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=chunksize)


def _make_clip(job: tuple[ClipSpec, Settings, str]) -> ManifestEntry:
    spec, settings, out = job
    frames, truth = render_clip(spec, settings)
    relative = f"videos/{spec.video_id}.mp4"
    write_mp4(frames, Path(out) / relative, settings.fps, settings.keyframe_s)
    count = settings.train_captions if spec.split == "train" else 1
    caption_rng = np.random.default_rng([settings.seed, 2, spec.index])
    return ManifestEntry(
        video_id=spec.video_id,
        path=relative,
        captions=captions_for(spec, count, caption_rng),
        split=spec.split,
        extra={"attributes": spec.attributes(), "event": truth.record(settings.fps)},
    )


def read_ceiling(manifest: str | Path) -> dict[str, float]:
    """The oracle ceiling stored beside a synthetic benchmark's manifest; empty for other benchmarks."""
    path = Path(manifest).parent / ORACLE_FILE
    return json.loads(path.read_text())["t2v_R1_ceiling"] if path.is_file() else {}


def generate(cfg: SyntheticConfig, progress: bool = True, force: bool = False) -> Path:
    """Write `videos/*.mp4` and `manifest.jsonl` under `cfg.out`; return the manifest path.

    A folder already holding a complete benchmark with the same settings is reused as it is: the
    manifest is written last, so an interrupted generation is redone rather than trusted.
    """
    out = Path(cfg.out)
    with exclusive(out, "benchmark generation"):  # two runs of one benchmark: the second waits, then reuses it
        return _generate(cfg, out, progress, force)


def _generate(cfg: SyntheticConfig, out: Path, progress: bool, force: bool) -> Path:
    settings = resolve(cfg)
    manifest, stamp = out / "manifest.jsonl", out / "synthetic.json"
    oracle = out / ORACLE_FILE
    identity = asdict(settings) | {"generator": GENERATOR_VERSION}
    if not force and manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == identity:
        if oracle.is_file():
            return manifest
    manifest.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(identity, indent=2) + "\n")
    specs = plan_clips(settings)
    (out / ORACLE_FILE).write_text(json.dumps({"t2v_R1_ceiling": oracle_ceiling(specs, settings)}, indent=2) + "\n")
    jobs = [(spec, settings, str(out)) for spec in specs]
    bar = tqdm(total=len(jobs), desc=f"synthetic {cfg.preset}", unit="clip", disable=not progress)
    entries = []
    for entry in in_processes(_make_clip, jobs, cfg.workers, chunksize=8):
        entries.append(entry)
        bar.update()
    bar.close()
    return write_manifest(entries, manifest)
