"""The trained first stage: off by default and then absent from the state dict; identity at the start; its loss
term moves stage 1 and the encoders beneath it, never the head's own modules or temperature; training it makes stage 1 rank like
the full score."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CAPTIONS as CAPTIONS
from conftest import MODEL_FRAMES as FRAMES

from hvd.config import ModelConfig, replace_keys
from hvd.model import build_model
from hvd.model.first_stage import ranking_distillation

MASK = torch.arange(FRAMES) < torch.tensor([[6], [3], [6], [5]])


def tiny(head: str, seed: int = 0, **first_stage: float):
    torch.manual_seed(seed)
    return build_model(replace_keys(ModelConfig(head=head), {f"first_stage.{k}": v for k, v in first_stage.items()}))


def test_off_by_default_the_model_and_its_state_dict_are_as_before():
    model = tiny("hvd")
    assert model.first_stage is None
    assert not [name for name in model.state_dict() if name.startswith("first_stage.")]


@pytest.mark.parametrize("head", ["hvd", "meanp", "xpool", "hcmi"])
def test_an_untrained_first_stage_ranks_as_the_heads_own_embeddings(head, tokens, frames):
    trained, plain = tiny(head, weight=1.0), tiny(head)
    plain.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("first_stage.")})
    with torch.no_grad():
        text, video = trained.encode_text(tokens), trained.encode_video(frames, MASK)
        ours = trained.text_embeddings(text) @ trained.video_embeddings(video).T
        theirs = plain.text_embeddings(text) @ plain.video_embeddings(video).T
    assert torch.equal(ours.argsort(dim=1), theirs.argsort(dim=1))


def _gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("distill", [0.0, 0.5, 1.0])
def test_the_stage1_term_moves_stage1_and_the_encoders_never_the_heads_own_modules(distill, tokens, frames):
    model = tiny("hvd", weight=1.0, distill=distill)
    text, video = model.encode_text(tokens), model.encode_video(frames, MASK)
    similarities = model.similarities(text, video)
    term = model.first_stage.loss(model.head.text_embedding(text), model.head.video_embedding(video),
                                  model.combine(similarities), model.logit_scale())
    grads = _gradients(model, term)
    moved = {name for name, g in grads.items() if g.abs().sum() > 0}
    assert {"first_stage.text.weight", "first_stage.video.weight"} <= moved
    assert any(name.startswith("backbone.clip.transformer.") for name in moved)  # the text encoder beneath it
    assert any(name.startswith("backbone.clip.visual.") for name in moved)  # the video encoder beneath it
    assert not [name for name in moved if name.startswith("head.")]  # FFSM and PFCM: the full score's own
    assert "backbone.clip.logit_scale" not in moved  # the head's temperature, stage 1 reads it only


def test_the_heads_terms_are_unchanged_by_the_stage1_term(tokens, frames):
    """The model's loss with stage 1 is the head's loss plus the stage-1 term: the head's gradients are the
    same whatever stage 1's weight."""
    with_stage1 = tiny("hvd", weight=2.0)
    plain = tiny("hvd")
    plain.load_state_dict({k: v for k, v in with_stage1.state_dict().items() if not k.startswith("first_stage.")})
    pixels = torch.randint(0, 256, (len(CAPTIONS), FRAMES, 64, 64, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    total, metrics = with_stage1(tokens, pixels, MASK)
    head_only, head_metrics = plain(tokens, pixels, MASK)
    assert metrics["loss_first_stage"] > 0
    assert total.item() == pytest.approx(head_only.item() + metrics["loss_first_stage"], rel=1e-5)
    assert {k: v for k, v in metrics.items() if k != "loss_first_stage"} == pytest.approx(head_metrics, rel=1e-5)
    head_params = [name for name, _ in plain.named_parameters() if name.startswith("head.")]
    ours, theirs = _gradients(with_stage1, total), _gradients(plain, head_only)
    for name in head_params:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_training_stage1_alone_makes_it_rank_like_the_full_score(tokens, frames):
    model = tiny("hvd", weight=1.0, distill=1.0)
    with torch.no_grad():
        text, video = model.encode_text(tokens), model.encode_video(frames, MASK)
        teacher = model.logit_scale() * model.score(text, video)
        t, v = model.head.text_embedding(text), model.head.video_embedding(video)
    stage1 = model.first_stage
    gap = lambda: float(ranking_distillation(model.logit_scale().detach() * stage1.embed_text(t) @ stage1.embed_video(v).T,  # noqa: E731
                                             teacher))
    before = gap()
    optimizer = torch.optim.Adam(stage1.parameters(), lr=1e-2)
    for _ in range(50):
        optimizer.zero_grad()
        stage1.loss(t, v, teacher / model.logit_scale().detach(), model.logit_scale().detach()).backward()
        optimizer.step()
    assert gap() < 0.5 * before


def test_ranking_distillation_is_zero_only_for_the_teachers_ranking():
    teacher = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    assert ranking_distillation(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert ranking_distillation(teacher.flip(1), teacher).item() > 0.01
