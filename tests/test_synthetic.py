"""The synthetic benchmark: real decodable files, deterministic, and knobs that do what they claim."""

from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pytest

from hvd.config import SyntheticConfig
from hvd.data.manifest import read_manifest, resolve_video_path
from hvd.data.synthetic import COLOURS, MOTION_PHRASES, SHAPES, generate, resolve


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


def test_captions_agree_with_attributes(tiny):
    for entry in read_manifest(tiny):
        attrs = entry.extra["attributes"]
        assert len(entry.captions) == (5 if entry.split == "train" else 1)
        assert len(set(entry.captions)) == len(entry.captions)
        for caption in entry.captions:
            text = caption.lower()
            assert attrs["colour"] in text and attrs["shape"] in text
            assert any(text.endswith(phrase) for phrase in MOTION_PHRASES[attrs["motion"]])
            other_colours = [c for c in COLOURS if c != attrs["colour"]]
            assert not any(f" {c} " in f" {text} " for c in other_colours)
            assert not any(f" {s} " in f" {text} " for s in SHAPES if s != attrs["shape"])


def test_confusable_negatives_exist(tiny):
    test = [e.extra["attributes"] for e in read_manifest(tiny) if e.split == "test"]
    same_object = any(
        a["colour"] == b["colour"] and a["shape"] == b["shape"] and a["motion"] != b["motion"] for a in test for b in test
    )
    same_motion = any(a["motion"] == b["motion"] and a["colour"] != b["colour"] for a in test for b in test)
    assert same_object and same_motion


def test_same_seed_same_bytes_and_frames_across_worker_counts(tmp_path, tiny):
    again = _generate(tmp_path, "again", workers=2)
    assert again.read_bytes() == tiny.read_bytes()
    for entry in read_manifest(tiny):
        assert resolve_video_path(entry, again).read_bytes() == resolve_video_path(entry, tiny).read_bytes()
    for entry in read_manifest(tiny)[:4]:
        np.testing.assert_array_equal(_decode(resolve_video_path(entry, tiny)), _decode(resolve_video_path(entry, again)))
    other = _generate(tmp_path, "other", seed=1)
    assert other.read_bytes() != tiny.read_bytes()


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
