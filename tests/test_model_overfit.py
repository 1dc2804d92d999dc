"""Each tiny model memorises 8 synthetic clips: evidence that backbone, head and loss learn together."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hvd.config import CHOICES, ModelConfig, SyntheticConfig, TrainConfig, XPoolHeadConfig
from hvd.data.synthetic import captions_for, plan_clips, render_clip, resolve
from hvd.model import IMAGE_MEAN, IMAGE_STD, build_model, build_tokenizer
from hvd.train.optim import build_optimizer

CLIPS, FRAMES, MAX_STEPS, LOSS_TARGET = 8, 4, 150, 0.05


def synthetic_batch() -> tuple[list[str], torch.Tensor]:
    """8 clips of the tiny synthetic benchmark (confusable pairs), 4 uniformly spaced frames each, normalised."""
    settings = resolve(SyntheticConfig(preset="tiny"))
    specs = plan_clips(settings)[:CLIPS]
    rng = np.random.default_rng(0)
    captions = [captions_for(spec, 1, rng)[0] for spec in specs]
    clips = np.stack([render_clip(spec, settings)[0] for spec in specs])
    picked = np.linspace(0, clips.shape[1] - 1, FRAMES).round().astype(int)
    frames = torch.from_numpy(clips[:, picked]).float().div(255).permute(0, 1, 4, 2, 3)
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
    return captions, (frames - mean) / std


@pytest.mark.slow
@pytest.mark.parametrize("head", CHOICES["model.head"])
def test_tiny_model_overfits_eight_clips(head):
    captions, frames = synthetic_batch()
    torch.manual_seed(0)
    # no dropout (X-Pool's 0.3): memorising is the question, and the loss and the scores must see one model
    cfg = ModelConfig(head=head, xpool=XPoolHeadConfig(dropout=0.0))
    model = build_model(cfg)
    tokens = build_tokenizer(cfg, max_words=32)(captions)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3), cfg)

    first = None
    for _ in range(MAX_STEPS):
        loss, _ = model.loss(model.encode_text(tokens), model.encode_video(frames))
        first = first if first is not None else loss.item()
        if loss.item() < LOSS_TARGET:
            break
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    assert first > 0.9 * math.log(CLIPS)  # at chance: each InfoNCE term starts near log(8) = 2.1
    assert loss.item() < LOSS_TARGET  # the minimum is 0
    model.eval()  # scored as retrieval scores
    scores = model.score(model.encode_text(tokens), model.encode_video(frames))
    assert torch.equal(scores.argmax(dim=1), torch.arange(CLIPS))  # text-to-video R@1 = 100%
    assert torch.equal(scores.argmax(dim=0), torch.arange(CLIPS))  # video-to-text R@1 = 100%
