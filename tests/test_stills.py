"""The warm start's data: captioned stills of the synthetic world, in the shard layout training reads."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hvd.config import ModelConfig, flatten, load_config
from hvd.data.shards import SUMMARY_FILE, frame_mask, frames_uint8, read_shards
from hvd.data.synthetic import COLOURS
from hvd.model import build_model
from hvd.registry.runs import config_differences
from hvd.train.warm_start import pretrain_config, stills_plan, warm_start, warm_start_fingerprint

COUNTS = {"train": 40, "val": 8}


@pytest.fixture(scope="module")
def stills(tmp_path_factory) -> Path:
    from hvd.data.stills import write_stills

    settings, _ = stills_plan(load_config())
    return write_stills(settings, COUNTS, tmp_path_factory.mktemp("stills") / "a", workers=1)


def test_stills_are_one_frame_shards_whose_captions_name_what_is_visible(stills):
    table = read_shards(stills, "train")
    assert table.num_rows == 40 and read_shards(stills, "val").num_rows == 8
    rows = table.to_pylist()
    assert frame_mask(rows).all() and frame_mask(rows).shape == (40, 1)
    visible = 0
    for row in rows:
        frame = frames_uint8(row)[0].astype(np.float32)
        assert frame.shape == (64, 64, 3) and len(row["captions"]) == 3
        colour = next(c for c in COLOURS if f" {c} " in f" {row['captions'][0].lower()} ")
        assert all(f" {colour} " in f" {caption.lower()} " for caption in row["captions"])
        near = np.linalg.norm(frame - np.array(COLOURS[colour], np.float32), axis=-1) < 60
        visible += int(near.sum() >= 6)
    # JPEG's chroma subsampling washes out a hollow bar's one-pixel rim now and then (docs/benchmarks.md)
    assert visible >= 0.95 * len(rows), f"the captioned object is in view in only {visible} of {len(rows)} stills"


def test_stills_are_byte_deterministic_and_reused(stills, tmp_path):
    from hvd.data.stills import write_stills

    settings, _ = stills_plan(load_config())
    again = write_stills(settings, COUNTS, tmp_path / "b", workers=2)
    read = lambda folder: pq.read_table(folder / "train").sort_by("video_id")  # noqa: E731
    assert read(again).equals(read(stills))
    stamp = (again / SUMMARY_FILE).stat().st_mtime_ns
    write_stills(settings, COUNTS, again)
    assert (again / SUMMARY_FILE).stat().st_mtime_ns == stamp  # same stills: nothing rewritten
    assert json.loads((again / SUMMARY_FILE).read_text())["splits"] == COUNTS


def test_warm_start_fingerprint_follows_what_decides_the_weights():
    base = load_config()
    assert warm_start_fingerprint(base) == warm_start_fingerprint(load_config(None, ["synthetic.event_fraction=0.2"]))
    assert warm_start_fingerprint(base) == warm_start_fingerprint(load_config(None, ["synthetic.entity_scale=0.15"]))
    assert warm_start_fingerprint(base) == warm_start_fingerprint(load_config(None, ["run.seed=3"]))  # seeds share it
    for change in ("pretrain.epochs=1", "model.preset=tiny-p8", "synthetic.seed=3", "synthetic.num_distractors=1"):
        assert warm_start_fingerprint(load_config(None, [change])) != warm_start_fingerprint(base), change


def test_an_unresolved_warm_start_is_a_clear_error():
    with pytest.raises(ValueError, match="model.pretrained=synthetic"):
        build_model(ModelConfig(pretrained="synthetic"))
    cfg = load_config(None, ["model.pretrained=null"])
    assert warm_start(cfg) is cfg  # nothing to resolve
    assert load_config().model.pretrained == "synthetic"  # the product's default; not made a path


def test_runs_sharing_a_warm_start_record_one_config_for_it():
    """Two studies' trials of one seed share a warm start: its run must read the same whatever benchmark folder or
    head knobs the trial has, so either resumes the warm start the other left unfinished."""
    base = load_config(None, ["synthetic.out=/tmp/a", "synthetic.event_fraction=0.15", "model.hvd.frame_keep=0.25"])
    other = load_config(None, ["synthetic.out=/tmp/b", "synthetic.entity_scale=0.3", "model.head=xpool"])
    fingerprint = warm_start_fingerprint(base)
    assert fingerprint == warm_start_fingerprint(other)
    shared = [pretrain_config(cfg, fingerprint, Path("/tmp/stills")) for cfg in (base, other)]
    assert flatten(shared[0]) == flatten(shared[1])
    assert not config_differences({k: str(v) for k, v in flatten(shared[0]).items()}, shared[1])
