"""The X-Pool, EERCF and HVP-Net heads: what they keep per video, padding, their own mechanics, bad settings.

Gradients, chunked scoring, two-stage retrieval, DDP and overfitting run for every head in test_model.py,
test_two_stage.py, test_model_distributed.py and test_model_overfit.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FRAMES as FRAMES

from hvd.config import ConfigError, ModelConfig, load_config
from hvd.model import build_model
from hvd.model.heads.eercf import pearson_constraint
from hvd.model.heads.hvp import default_layers


def tiny_model(head: str, **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(head=head, **overrides)).eval()


@pytest.mark.parametrize(
    ("head", "entities", "views"),
    [("xpool", 0, 0), ("eercf", FRAMES * 16, 1), ("hvp", 3 * 12, 2)],  # eercf: every patch; hvp: 3 blocks of 96 -> 12
)
def test_features_per_video(head, entities, views, frames):
    video = tiny_model(head).encode_video(frames)
    assert video.frames.shape == (4, FRAMES, 128) and video.patches.shape == (4, entities, 128)
    assert video.patch_frames.shape == (4, entities, FRAMES) and video.frame_views.shape == (4, views, FRAMES, 128)
    for unit in (video.frames, video.patches, video.frame_views):
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(unit.shape[:-1]))


@pytest.mark.parametrize("head", ["xpool", "eercf", "hvp"])
def test_padding_frames_change_nothing(head, tokens, frames):
    """A clip padded with blank frames scores as its real frames alone, against every caption."""
    model = tiny_model(head)
    mask = torch.arange(FRAMES) < torch.tensor([[6], [3], [6], [1]])
    blanked = frames.masked_fill(~mask[:, :, None, None, None], 0.0)
    text = model.encode_text(tokens)
    with torch.no_grad():
        scores = model.score(text, model.encode_video(blanked, mask))
        for v, real in enumerate(mask.sum(dim=1).tolist()):
            alone = model.score(text, model.encode_video(frames[v : v + 1, :real]))
            torch.testing.assert_close(scores[:, v : v + 1], alone, rtol=1e-4, atol=1e-5)


def test_xpool_attention_is_a_distribution_over_real_frames_and_pools_per_caption(tokens, frames):
    model = tiny_model("xpool")
    mask = torch.arange(FRAMES) < torch.tensor([[6], [2], [6], [4]])
    text, video = model.encode_text(tokens), model.encode_video(frames, mask)
    with torch.no_grad():
        attention = model.head.attention(text.sentence, video.frames, video.frame_mask)
        pooled = model.head.pooled(text.sentence, video.frames, video.frame_mask)
    assert attention.shape == (4, 4, FRAMES)
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(4, 4))
    assert not attention[:, ~mask].any()
    # the pooled video differs per caption: text-conditioned, unlike mean pooling
    assert (pooled[0] - pooled[1]).norm(dim=-1).min() > 0
    torch.testing.assert_close(model.score(text, video), torch.einsum("td,tvd->tv", text.sentence, pooled))


def test_eercf_coarse_stage_is_the_weighted_sentence_against_the_contextualised_mean(tokens, frames):
    model = tiny_model("eercf")
    text, video = model.encode_text(tokens), model.encode_video(frames)
    with torch.no_grad():
        model.head.coarse_weight.add_(0.1 * torch.randn(128, 128))
        sentence, coarse = model.global_embeddings(text, video)
    torch.testing.assert_close(sentence, text.sentence @ model.head.coarse_weight)
    expected = F.normalize(video.frame_views[:, 0].mean(dim=1), dim=-1)
    torch.testing.assert_close(coarse, expected)
    # the temporal transformer changes the frames (context), the residual keeps them close to CLIP's
    assert not torch.allclose(video.frame_views[:, 0], video.frames)
    assert F.cosine_similarity(video.frame_views[:, 0], video.frames, dim=-1).min() > 0


def test_eercf_temporal_blocks_start_as_clips_text_blocks(tmp_path):
    torch.manual_seed(0)
    clip = build_model(ModelConfig(head="meanp")).backbone.clip
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    model = build_model(ModelConfig(head="eercf", pretrained=str(path), temporal_layers=2))
    assert len(model.head.temporal) == 2
    for block, text_block in zip(model.head.temporal, clip.transformer.resblocks, strict=False):
        for (name, value), (_, expected) in zip(block.state_dict().items(), text_block.state_dict().items(), strict=True):
            assert torch.equal(value, expected), name
    torch.testing.assert_close(model.head.frame_positions.detach(), clip.positional_embedding[:32].detach())


def test_pearson_constraint_is_smallest_for_perfectly_correlated_features():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(16, 8, generator=generator)
    # EERCF's form: unbiased std, then a mean over the batch, so perfect correlation reads (B - 1) / B
    assert float(pearson_constraint(text, 3 * text + 1)) == pytest.approx(0.14 * 8 * (1 / 16) ** 2, rel=1e-4)
    assert float(pearson_constraint(text, -text)) == pytest.approx(0.14 * 8 * (31 / 16) ** 2, rel=1e-4)
    unrelated = torch.randn(16, 8, generator=generator)
    assert 0.14 * 8 * 0.5 < float(pearson_constraint(text, unrelated)) < 0.14 * 8 * 2


def test_eercf_loss_adds_the_weighted_pearson_term(tokens, frames):
    model = tiny_model("eercf")
    text, video = model.encode_text(tokens), model.encode_video(frames)
    loss, metrics = model.loss(text, video)
    weighted = metrics["loss_weak"] + metrics["loss_strong"] + metrics["loss_pearson"]
    assert loss.item() == pytest.approx(weighted, rel=1e-5)
    assert metrics["loss_pearson"] > 0
    off = tiny_model("eercf", pearson_weight=0.0)
    assert "loss_pearson" not in off.loss(off.encode_text(tokens), off.encode_video(frames))[1]


def test_hvp_blocks_and_their_entities(tokens, frames):
    assert default_layers(12) == (0, 6, 11) and default_layers(4) == (0, 2, 3)
    model = tiny_model("hvp", layers=[1, 3])
    assert model.head.vision_layers == (1, 3)
    mask = torch.arange(FRAMES) < torch.tensor([[6], [3], [6], [1]])
    video = model.encode_video(frames, mask)
    assert video.patches.shape == (4, 2 * 12, 128) and video.frame_views.shape == (4, 1, FRAMES, 128)
    # the last block's frames are what CLIP pools; the earlier block's differ
    with torch.no_grad():
        pooled = model.backbone.encode_images(frames.flatten(0, 1), with_patches=False)[0]
    torch.testing.assert_close(video.frames, F.normalize(pooled, dim=-1).unflatten(0, (4, FRAMES)))
    assert not torch.allclose(video.frame_views[:, 0], video.frames)
    assert not video.patch_frames[~mask[:, None, :].expand_as(video.patch_frames)].any()  # no padding frame
    parts = model.similarities(model.encode_text(tokens), video)
    assert sorted(parts) == sorted(f"block{b}_{n}" for b in (1, 3) for n in ("sentence_frames", "sentence_patches", "words_patches"))


def test_bad_head_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"model.layers=\[0, 4\]: distinct ViT block indices in \[0, 3\]"):
        build_model(ModelConfig(head="hvp", layers=[0, 4]))
    with pytest.raises(ConfigError, match="model.head"):
        load_config(None, ["model.head=xclip"])
    with pytest.raises(ConfigError, match="model.temporal_layers"):
        load_config(None, ["model.temporal_layers=0"])
    model = tiny_model("eercf")
    with pytest.raises(ValueError, match="at most 32 frames, got 40"):
        model.encode_video(torch.randn(1, 40, 3, 64, 64))
