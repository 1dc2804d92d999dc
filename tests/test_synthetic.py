"""The synthetic benchmark: real decodable files, deterministic, and knobs that do what they claim."""

import json
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pytest

from hvd.config import SyntheticConfig
from hvd.data.manifest import read_manifest, resolve_video_path
from hvd.data.synthetic import (
    COLOURS,
    FILLS,
    MOTION_PHRASES,
    ORACLE_FILE,
    REGIONS,
    SHAPES,
    SIZES,
    generate,
    oracle_ceiling,
    plan_clips,
    resolve,
)


def _generate(tmp_path: Path, name: str, **overrides) -> Path:
    cfg = SyntheticConfig(preset="tiny", out=str(tmp_path / name), workers=overrides.pop("workers", 1), **overrides)
    return generate(cfg, progress=False)


def _decode(path: Path) -> np.ndarray:
    reader = decord.VideoReader(str(path), num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def _target_pixels(frames: np.ndarray, colour: str) -> np.ndarray:
    """Pixels per frame within a small RGB distance of the target colour."""
    distance = np.linalg.norm(frames.astype(np.float32) - np.array(COLOURS[colour], np.float32), axis=-1)
    return (distance < 60).sum(axis=(1, 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("synth"), "tiny")


def test_every_file_decodes_to_the_promised_frames(tiny):
    settings = resolve(SyntheticConfig(preset="tiny"))
    entries = read_manifest(tiny)
    assert Counter(e.split for e in entries) == {"train": 24, "val": 8, "test": 8}
    for entry in entries:
        reader = decord.VideoReader(str(resolve_video_path(entry, tiny)), num_threads=1)
        assert len(reader) == settings.num_frames
        assert reader[0].shape == (settings.frame_size, settings.frame_size, 3)
        assert reader.get_avg_fps() == pytest.approx(settings.fps)


def _says(text: str, phrase: str) -> bool:
    return f" {phrase} " in f" {text.replace(',', ' ')} "


def test_captions_name_every_attribute_and_no_other(tiny):
    for entry in read_manifest(tiny):
        attrs = entry.extra["attributes"]
        assert set(attrs) == {"colour", "shape", "size", "fill", "region"}  # order-free: no motion
        assert len(entry.captions) == (5 if entry.split == "train" else 1)
        assert len(set(entry.captions)) == len(entry.captions)
        for caption in entry.captions:
            text = caption.lower()
            assert _says(text, attrs["colour"]) and _says(text, attrs["shape"])
            assert any(_says(text, word) for word in SIZES[attrs["size"]][1])
            assert any(_says(text, word) for word in FILLS[attrs["fill"]])
            assert any(_says(text, phrase) for phrase in REGIONS[attrs["region"]][1])
            assert not any(_says(text, c) for c in COLOURS if c != attrs["colour"])
            assert not any(_says(text, s) for s in SHAPES if s != attrs["shape"])
            assert not any(_says(text, p) for phrases in MOTION_PHRASES.values() for p in phrases)


def test_pairs_differ_in_exactly_one_named_attribute():
    specs = plan_clips(resolve(SyntheticConfig(preset="demo")))
    differences = [
        sum(a != b for a, b in zip(first.attributes().values(), second.attributes().values(), strict=True))
        for first, second in zip(specs[0::2], specs[1::2], strict=True)
        if first.split == second.split
    ]
    assert differences and set(differences) == {1}


def test_oracle_ceiling_counts_attribute_collisions(tiny):
    settings = resolve(SyntheticConfig(preset="tiny"))
    specs = plan_clips(settings)
    assert json.loads((tiny.parent / ORACLE_FILE).read_text())["t2v_R1_ceiling"] == oracle_ceiling(specs, settings)
    twins = [specs[0], specs[0].__class__(**{**specs[0].__dict__, "index": 1, "video_id": "twin"})]
    test_twins = [s.__class__(**{**s.__dict__, "split": "test"}) for s in twins]
    assert oracle_ceiling(test_twins, settings) == {"test": 50.0}  # two videos one caption fits: a coin flip
    demo = resolve(SyntheticConfig(preset="demo"))
    assert oracle_ceiling(plan_clips(demo), demo)["test"] > 90  # few exact duplicates among 200 test videos


def test_temporal_benchmark_names_the_motion():
    settings = resolve(SyntheticConfig(preset="tiny", temporal=True))
    specs = plan_clips(settings)
    assert all(spec.motion in MOTION_PHRASES for spec in specs)
    rng = np.random.default_rng(0)
    from hvd.data.synthetic import captions_for

    for spec in specs[:6]:
        (caption,) = captions_for(spec, 1, rng)
        assert any(caption.endswith(phrase) for phrase in MOTION_PHRASES[spec.motion])


def test_same_seed_same_bytes_and_frames_across_worker_counts(tmp_path, tiny):
    again = _generate(tmp_path, "again", workers=2)
    assert again.read_bytes() == tiny.read_bytes()
    for entry in read_manifest(tiny):
        assert resolve_video_path(entry, again).read_bytes() == resolve_video_path(entry, tiny).read_bytes()
    for entry in read_manifest(tiny)[:4]:
        np.testing.assert_array_equal(_decode(resolve_video_path(entry, tiny)), _decode(resolve_video_path(entry, again)))
    other = _generate(tmp_path, "other", seed=1)
    assert other.read_bytes() != tiny.read_bytes()


def test_ground_truth_names_the_event_frames_and_boxes_the_target(tiny):
    """The manifest's `event`: the frames where the target is on screen, and a box around its pixels in each."""
    size = resolve(SyntheticConfig(preset="tiny")).frame_size
    for entry in read_manifest(tiny):
        event = entry.extra["event"]
        frames = _decode(resolve_video_path(entry, tiny))
        colour = np.array(COLOURS[entry.extra["attributes"]["colour"]], np.float32)
        near = np.linalg.norm(frames.astype(np.float32) - colour, axis=-1) < 60  # [T, H, W]
        shown = np.flatnonzero(near.sum(axis=(1, 2)) > 4)
        assert shown.tolist() == list(range(event["start_frame"], event["end_frame"]))
        assert len(event["boxes"]) == event["end_frame"] - event["start_frame"]
        for frame, (x0, y0, x1, y1) in zip(shown, event["boxes"], strict=True):
            ys, xs = np.nonzero(near[frame])
            inside = (xs >= x0 * size - 1) & (xs < x1 * size + 1) & (ys >= y0 * size - 1) & (ys < y1 * size + 1)
            assert inside.mean() > 0.95, (entry.video_id, frame)
            assert (x1 - x0) * (y1 - y0) < 0.5  # a box around the object, not the frame


def test_second_call_reuses_a_complete_benchmark(tiny):
    before = tiny.stat().st_mtime_ns
    assert generate(SyntheticConfig(preset="tiny", out=str(tiny.parent), workers=1), progress=False) == tiny
    assert tiny.stat().st_mtime_ns == before


def _measure(manifest: Path) -> tuple[float, float]:
    """Mean share of frames showing the target, and its mean pixel share while shown."""
    shown, area = [], []
    for entry in read_manifest(manifest):
        pixels = _target_pixels(_decode(resolve_video_path(entry, manifest)), entry.extra["attributes"]["colour"])
        visible = pixels > 4
        shown.append(visible.mean())
        area.append(pixels[visible].mean() / 64**2)
    return float(np.mean(shown)), float(np.mean(area))


def test_event_fraction_sets_how_long_the_target_is_on_screen(tmp_path):
    short, _ = _measure(_generate(tmp_path, "short", event_fraction=0.25, num_train=8, num_val=0, num_test=0))
    long, _ = _measure(_generate(tmp_path, "long", event_fraction=0.75, num_train=8, num_val=0, num_test=0))
    assert short == pytest.approx(0.25, abs=0.08)
    assert long == pytest.approx(0.75, abs=0.08)


def test_entity_scale_sets_the_target_size(tmp_path):
    _, small = _measure(_generate(tmp_path, "small", entity_scale=0.15, num_train=8, num_val=0, num_test=0))
    _, large = _measure(_generate(tmp_path, "large", entity_scale=0.45, num_train=8, num_val=0, num_test=0))
    # area grows with the square of the scale: 9x nominally; compression blurs small objects most
    assert 5 < large / small < 13


def test_bad_knob_names_the_key():
    with pytest.raises(ValueError, match="synthetic.event_fraction"):
        resolve(SyntheticConfig(preset="tiny", event_fraction=1.5))
