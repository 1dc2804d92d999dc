"""The FFSM rule harness (benchmarks/frame_rules.py) on hand-made cosines: what each rule keeps is scored against
the event frames as the mechanism metrics score it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SPEC = importlib.util.spec_from_file_location("frame_rules", Path(__file__).parents[1] / "benchmarks" / "frame_rules.py")
frame_rules = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(frame_rules)


def test_a_rule_that_keeps_exactly_the_event_frames_scores_recall_and_precision_one():
    # video 0: frames 2, 3 show the event and stand 0.4 above the rest; video 1: the event fills its 8 real frames
    similarity = torch.tensor([[0.1] * 12, [0.6] * 12])
    similarity[0, 2:4] = 0.5
    mask = torch.stack([torch.ones(12, dtype=torch.bool), torch.arange(12) < 8])
    event = torch.stack([torch.zeros(12, dtype=torch.bool), torch.ones(12, dtype=torch.bool)])
    event[0, 2:4] = True
    found = frame_rules.rule_outcomes(similarity, mask, event, [0.1])
    assert found["near_best 0.1"] == {"recall": 1.0, "precision": 1.0, "kept": 5.0}  # (2 + 8) / 2 videos
    assert found["share 0.5"] == {"recall": 0.75, "precision": round((2 / 6 + 1) / 2, 3), "kept": 5.0}
    assert found["share 0.25"]["precision"] == round((2 / 3 + 1) / 2, 3)
    assert found["above_mean"]["recall"] == 1.0
