"""The stage-1 form harness (benchmarks/stage1_forms.py) on hand-made features: the frame forms find a caption's
short event where the mean frame drowns it, and padding frames never count."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # stage1_forms reads retrieval_speed's feature cache
_SPEC = importlib.util.spec_from_file_location("stage1_forms", BENCHMARKS / "stage1_forms.py")
stage1_forms = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(stage1_forms)


def test_the_best_frame_finds_a_short_event_the_mean_frame_ranks_second():
    caption, clutter, other = torch.eye(3)
    # video 0: one frame of the event among eleven of clutter; video 1: half-like frames throughout
    event_video = torch.stack([caption] + [clutter] * 11)
    near_video = torch.nn.functional.normalize(caption + other, dim=0).expand(12, 3)
    frames, mask = torch.stack([event_video, near_video]), torch.ones(2, 12, dtype=torch.bool)
    forms = stage1_forms.frame_forms(caption[None], frames, mask)
    mean_frame = caption @ torch.nn.functional.normalize(frames.mean(dim=1), dim=-1).T
    assert mean_frame.argmax() == 1  # today's stage 1 ranks the diluted event second
    assert forms["best frame"].argmax(dim=1).item() == 0
    assert torch.allclose(forms["best frame"][0], torch.tensor([1.0, 2**-0.5]))
    assert torch.allclose(forms["mean of best 2"][0], torch.tensor([0.5, 2**-0.5]))


def test_padding_frames_never_count_and_a_short_clip_averages_its_real_frames():
    caption = torch.tensor([1.0, 0.0])
    frames = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [1.0, 0.0]]])  # frames 1 and 2 are padding that would match
    mask = torch.tensor([[True, False, False]])
    forms = stage1_forms.frame_forms(caption[None], frames, mask)
    assert torch.allclose(forms["best frame"], torch.tensor([[0.6]]))
    assert torch.allclose(forms["mean of best 3"], torch.tensor([[0.6]]))
