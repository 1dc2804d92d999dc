"""Mechanism metrics on hand-made cases, then on real heads scoring rendered synthetic clips."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from hvd.config import ModelConfig, SyntheticConfig
from hvd.data.decode import DecodedClip
from hvd.data.prepare import SHARD_SCHEMA, ground_truth
from hvd.data.sampling import uniform_indices
from hvd.data.synthetic import captions_for, plan_clips, render_clip, resolve
from hvd.eval.explain import PairExplanation
from hvd.eval.mechanism import (
    entity_purity_split,
    event_mass,
    frame_recall_precision,
    mechanism_line,
    mechanism_metrics,
    pair_mechanism,
    target_patches,
)
from hvd.model import build_model, build_tokenizer

EVENT = np.array([False, False, True, True, True, False, False, False])
VALID = np.ones(8, bool)


def test_a_head_that_keeps_exactly_the_event_frames_has_recall_and_precision_one():
    assert frame_recall_precision(EVENT, EVENT, VALID) == (1.0, 1.0)
    half = np.array([False, False, True, False, False, False, True, False])
    assert frame_recall_precision(half, EVENT, VALID) == (pytest.approx(1 / 3), 0.5)
    assert frame_recall_precision(EVENT, np.zeros(8, bool), VALID) == (None, 0.0)  # the frames miss the event
    padding = np.arange(8) < 4  # event frame 4 is padding: not counted
    assert frame_recall_precision(EVENT, EVENT, padding) == (1.0, 1.0)


def test_event_mass_is_the_chance_share_for_uniform_weights_and_one_for_weights_on_the_event():
    assert event_mass(np.full(8, 1 / 8), EVENT, VALID) == pytest.approx(3 / 8)
    assert event_mass(EVENT / 3, EVENT, VALID) == pytest.approx(1.0)
    assert event_mass(np.full(8, 1.0), EVENT, np.arange(8) < 4) == pytest.approx(2 / 4)  # padding weighs nothing


def test_target_patches_cover_the_box_and_an_object_smaller_than_a_patch_still_has_one():
    assert target_patches([0.0, 0.0, 1.0, 1.0], 4).all()
    left_half = target_patches([0.0, 0.0, 0.5, 1.0], 4)
    assert left_half[:, :2].all() and not left_half[:, 2:].any()
    speck = target_patches([0.6, 0.1, 0.62, 0.12], 4)
    assert speck.sum() == 1 and speck[0, 2]


def test_an_entity_made_only_of_target_patches_is_pure_and_a_split_target_counts_its_entities():
    target = np.zeros((2, 4, 4), bool)
    target[:, :2, :2] = True
    entities = np.full((2, 4, 4), 5)
    entities[:, :2, :2] = 1  # entity 1 is exactly the target's patches, in both frames
    assert entity_purity_split(entities, target) == (1.0, 1.0)
    entities[0, 0, 0] = 2  # one of its patches joins another entity made only of target patches
    assert entity_purity_split(entities, target) == (1.0, 1.5)
    mixed = np.full((2, 4, 4), 5)
    mixed[:, :2, :] = 1  # entity 1: the target's 8 patches and 8 of clutter
    assert entity_purity_split(mixed, target) == (0.5, 1.0)
    assert entity_purity_split(np.full((2, 4, 4), -1), target) is None  # nothing clustered (frames FFSM dropped)


def test_pair_metrics_of_an_oracle_head():
    entities = np.tile(np.arange(16).reshape(1, 4, 4), (8, 1, 1)) + 16 * np.arange(8)[:, None, None]
    pair = PairExplanation("c", "v", 1, np.zeros((8, 4, 4, 3), np.uint8), VALID, np.zeros(8), EVENT, entities,
                           "legend")
    boxes = [[0.0, 0.0, 0.25, 0.25] if on else [] for on in EVENT]  # the top-left patch: one entity per frame
    found = pair_mechanism(pair, EVENT, boxes)
    assert found == {"frame_recall": 1.0, "frame_precision": 1.0, "event_mass": 1.0, "event_share": 3 / 8,
                     "entity_purity": 1.0, "entity_split": 1.0}
    line = mechanism_line({f"test/mechanism/{k}": v for k, v in found.items()})
    assert line == ("event frames: recall 1.00, precision 1.00, mass 1.00 (chance 0.38); "
                    "target entity: purity 1.00, split 1.00")


def _rows(count: int) -> pa.Table:
    """Shard rows of rendered synthetic clips (12 of 20 frames, uniform), ground truth as prepare writes it."""
    settings = dataclasses.replace(resolve(SyntheticConfig(preset="tiny", event_fraction=0.3)), num_train=count)
    rows = []
    for spec in plan_clips(settings)[:count]:
        frames, truth = render_clip(spec, settings)
        indices = uniform_indices(len(frames), 12).tolist()
        clip = DecodedClip([frames[i].tobytes() for i in indices], 12, indices, [i / settings.fps for i in indices],
                           len(frames), float(settings.fps), len(frames) / settings.fps, False)
        rows.append({"video_id": spec.video_id, "split": "test", "frame_codec": "raw", "frame_size": 64,
                     "num_frames": 12, "source_path": "", "captions": captions_for(spec, 1, np.random.default_rng(0)),
                     **dataclasses.asdict(clip), **ground_truth(truth.record(settings.fps), clip)})
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


@pytest.mark.parametrize("head", ["hvd", "meanp", "xpool", "eercf", "hvp", "hcmi"])
def test_real_heads_report_their_mechanism_on_rendered_clips(head):
    table = _rows(6)
    cfg = ModelConfig(preset="tiny", head=head)
    model = build_model(cfg)
    found = mechanism_metrics(model, build_tokenizer(cfg, 32), table)
    assert found["mechanism/pairs"] == 6
    share = np.mean([np.mean(flags) for flags in table["event_frames"].to_pylist()])
    assert found["mechanism/event_share"] == pytest.approx(share)
    assert all(0.0 <= found[f"mechanism/{key}"] <= 1.0 for key in ("frame_recall", "frame_precision", "event_mass"))
    if head == "meanp":  # every frame kept and weighed alike: recall 1, precision and mass the chance share
        assert found["mechanism/frame_recall"] == 1.0
        assert found["mechanism/frame_precision"] == pytest.approx(share)
        assert found["mechanism/event_mass"] == pytest.approx(share)
    assert ("mechanism/entity_purity" in found) == (head in ("hvd", "hvp"))
    if head in ("hvd", "hvp"):
        assert 0.0 < found["mechanism/entity_purity"] <= 1.0 and found["mechanism/entity_split"] >= 1.0


def test_a_benchmark_without_ground_truth_gives_no_mechanism_metrics():
    table = _rows(2).drop_columns(["event_frames", "target_boxes"])
    cfg = ModelConfig(preset="tiny", head="hvd")
    assert mechanism_metrics(build_model(cfg), build_tokenizer(cfg, 32), table) == {}
