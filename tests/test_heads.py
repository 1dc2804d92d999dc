"""The X-Pool, EERCF, HVP-Net and HCMI heads: what they keep per video, padding, their own mechanics, bad settings.

Gradients, chunked scoring, two-stage retrieval, DDP and overfitting run for every head in test_model.py,
test_two_stage.py, test_model_distributed.py and test_model_overfit.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FRAMES as FRAMES

from hvd.config import ConfigError, ModelConfig, load_config, replace_keys
from hvd.model import build_model
from hvd.model.heads.base import words_entities
from hvd.model.heads.eercf import EVAL_WEIGHTS, WEAK, pearson_constraint
from hvd.model.heads.hcmi import ENHANCE, MARGIN, denoised_targets, hierarchical_infonce
from hvd.model.heads.hvp import default_layers
from hvd.model.losses import symmetric_infonce


def tiny_model(head: str, **knobs):
    """A tiny model of `head`; each knob a `ModelConfig` field or one of the head's own (`pfcm_scope=...`)."""
    torch.manual_seed(0)
    top = {name: value for name, value in knobs.items() if hasattr(ModelConfig, name)}
    own = {f"{head}.{name}": value for name, value in knobs.items() if name not in top}
    return build_model(replace_keys(ModelConfig(head=head), top | own)).eval()


@pytest.mark.parametrize(
    ("head", "entities", "views"),
    # eercf: every patch; hvp: 3 blocks of 96 -> 12; hcmi: its clips, ceil(6 frames * 0.25)
    [("xpool", 0, 0), ("eercf", FRAMES * 16, 1), ("hvp", 3 * 12, 2), ("hcmi", 2, 1)],
)
def test_features_per_video(head, entities, views, frames):
    video = tiny_model(head).encode_video(frames)
    assert video.frames.shape == (4, FRAMES, 128) and video.patches.shape == (4, entities, 128)
    assert video.patch_frames.shape == (4, entities, FRAMES) and video.frame_views.shape == (4, views, FRAMES, 128)
    for unit in (video.frames, video.patches, video.frame_views):
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(unit.shape[:-1]))


@pytest.mark.parametrize("head", ["xpool", "eercf", "hvp", "hcmi"])
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


@pytest.mark.parametrize("head", ["eercf", "hcmi"])
def test_frame_transformer_starts_as_clips_text_blocks(head, tmp_path):
    torch.manual_seed(0)
    clip = build_model(ModelConfig(head="meanp")).backbone.clip
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    temporal = tiny_model(head, pretrained=str(path), temporal_layers=2).head.temporal
    assert len(temporal.blocks) == 2
    for block, text_block in zip(temporal.blocks, clip.transformer.resblocks, strict=False):
        for (name, value), (_, expected) in zip(block.state_dict().items(), text_block.state_dict().items(), strict=True):
            assert torch.equal(value, expected), name
    torch.testing.assert_close(temporal.positions.detach(), clip.positional_embedding[:32].detach())


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
    assert default_layers(12) == (0, 5, 11) and default_layers(4) == (0, 1, 3)  # HVP-Net's on ViT-B
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


def test_eercf_gate_is_detached_as_in_its_code(tokens, frames):
    """The strong score reaches the CLIP frames only through the TIB gate, which passes no gradient."""
    model = tiny_model("eercf")
    text, video = model.encode_text(tokens), model.encode_video(frames)
    video.frames.detach_().requires_grad_()
    model.head.similarities(text, video)["strong"].sum().backward()
    assert video.frames.grad is None or not video.frames.grad.any()
    pairs = model.head.pair_similarities(text, video)["strong"]
    assert not torch.autograd.grad(pairs.sum(), video.frames, allow_unused=True, materialize_grads=True)[0].any()
    assert model.head.similarities(text, video)["frames"].requires_grad  # the weak frame score still learns


def test_eercf_trains_on_weak_and_strong_and_ranks_with_its_rerank_weights(tokens, frames):
    model = tiny_model("eercf", pearson_weight=0.0)
    text, video = model.encode_text(tokens), model.encode_video(frames)
    with torch.no_grad():
        parts = model.similarities(text, video)
        assert sorted(parts) == ["coarse", "frames", "patches", "strong"]
        # EERCF's evaluation: 0.5 coarse + 0.8 weak frames + 0.2 weak patches + 0.2 strong frames
        assert EVAL_WEIGHTS == {"coarse": 0.5, "frames": 0.8, "patches": 0.2, "strong": 0.2}
        expected = sum(weight * parts[name] for name, weight in EVAL_WEIGHTS.items())
        torch.testing.assert_close(model.score(text, video), expected)
        # its training: 0.8 InfoNCE(0.5 coarse + 0.5 frames + 0.05 patches) + 0.2 InfoNCE(strong)
        _, metrics = model.loss(text, video)
        scale = model.logit_scale()
        weak = 0.5 * parts["coarse"] + 0.5 * parts["frames"] + 0.05 * parts["patches"]
        assert WEAK == {"coarse": 0.5, "frames": 0.5, "patches": 0.05}
        assert metrics["loss_weak"] == pytest.approx(0.8 * float(symmetric_infonce(scale * weak)), rel=1e-5)
        assert metrics["loss_strong"] == pytest.approx(0.2 * float(symmetric_infonce(scale * parts["strong"])), rel=1e-5)


def test_hvp_blocks_share_one_pfcm_and_one_set_of_weighting_networks():
    three, two = tiny_model("hvp"), tiny_model("hvp", layers=[1, 3])
    assert three.head.vision_layers == (0, 1, 3)
    count = lambda m: sum(p.numel() for p in m.head.parameters())  # noqa: E731
    assert count(three) == count(two)  # a block more adds no parameters
    assert {name.split(".")[0] for name, _ in three.head.named_parameters()} == {"matcher"}


def test_hvp_word_weights_are_raw_by_default(tokens, frames):
    generator = torch.Generator().manual_seed(0)
    words = F.normalize(torch.randn(2, 3, 16, generator=generator), dim=-1)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    entities = F.normalize(torch.randn(3, 4, 16, generator=generator), dim=-1)
    seen, entity_logits = torch.ones(2, 3, 4, dtype=torch.bool), torch.zeros(3, 4)
    logits = torch.randn(2, 3, generator=generator)
    similarity = torch.einsum("tld,ved->tlve", words, entities)
    best_entity = similarity.amax(dim=-1)  # [t, l, v]
    video_to_text = similarity.masked_fill(~mask[:, :, None, None], -2).amax(dim=1).mean(dim=-1)
    raw = (best_entity * (logits * mask)[:, :, None]).sum(dim=1)  # each word's logit as its weight, unnormalised
    torch.testing.assert_close(words_entities(words, mask, logits, entities, seen, entity_logits, raw_word_weights=True),
                               (raw + video_to_text) / 2)
    softmax = (best_entity * logits.masked_fill(~mask, -math.inf).softmax(dim=-1)[:, :, None]).sum(dim=1)
    torch.testing.assert_close(words_entities(words, mask, logits, entities, seen, entity_logits),
                               (softmax + video_to_text) / 2)
    model, normalised = tiny_model("hvp"), tiny_model("hvp", word_weights="softmax")
    assert model.head.matcher.raw_word_weights and not normalised.head.matcher.raw_word_weights
    text, video = model.encode_text(tokens), model.encode_video(frames)
    with torch.no_grad():
        ours, theirs = model.similarities(text, video), normalised.similarities(text, video)
    torch.testing.assert_close(ours["block0_sentence_frames"], theirs["block0_sentence_frames"])
    assert not torch.allclose(ours["block0_words_patches"], theirs["block0_words_patches"])


def test_hcmi_clips_partition_the_real_frames_and_merge_them(tokens, frames):
    model = tiny_model("hcmi")
    mask = torch.arange(FRAMES) < torch.tensor([[6], [3], [6], [1]])
    video = model.encode_video(frames, mask)
    members = video.patch_frames  # [4, clips, T]
    assert members.shape == (4, 2, FRAMES)
    torch.testing.assert_close(members.sum(dim=1), mask.long())  # every real frame in one clip, padding in none
    assert members.any(dim=-1).sum(dim=1).tolist() == [2, 1, 2, 1]  # ceil(real frames * 0.25) clips
    context = video.frame_views[:, 0]
    for v in range(4):  # the merge weights start equal: a clip is the normalised mean of its frames
        for c in members[v].any(dim=-1).nonzero().flatten():
            mean = F.normalize(context[v, members[v, c]].mean(dim=0), dim=0)
            torch.testing.assert_close(video.patches[v, c], mean)
    clips = video.patches * members.any(dim=-1, keepdim=True)
    torch.testing.assert_close(model.head.video_token(video), F.normalize(clips.sum(dim=1), dim=-1))
    text = model.encode_text(tokens)
    t, v = model.global_embeddings(text, video)
    torch.testing.assert_close(model.similarities(text, video)["video_sentence"], t @ v.T)
    parts = model.head.explain(text.sentence[0], video.frames[1], None, mask[1])
    assert parts["groups"].tolist() == [0, 0, 0, -1, -1, -1] and parts["kept"].tolist() == [True] * 3 + [False] * 3


def test_hcmi_phrases_group_each_captions_words():
    model = tiny_model("hcmi")
    generator = torch.Generator().manual_seed(0)
    words = F.normalize(torch.randn(3, 10, 128, generator=generator), dim=-1)
    mask = torch.arange(10) < torch.tensor([[10], [4], [7]])
    phrases, phrase_mask, assignment = model.head.phrases(words, mask)
    assert phrase_mask.sum(dim=1).tolist() == [3, 1, 2]  # ceil(words * 0.25)
    assert (assignment[~mask] == -1).all() and (assignment[mask] >= 0).all()
    torch.testing.assert_close(phrases[1, 0], F.normalize(words[1, :4].mean(dim=0), dim=0))


def test_hcmi_denoised_targets_share_a_label_only_between_captions_encoded_alike():
    generator = torch.Generator().manual_seed(0)
    sentence = F.normalize(torch.randn(5, 64, generator=generator), dim=-1)
    sentence[3] = sentence[1]  # two captions that say the same thing
    targets = denoised_targets(sentence)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(5))
    assert targets[1, 3] == pytest.approx(0.25, abs=1e-4) and targets[1, 1] == pytest.approx(0.75, abs=1e-4)
    alone = [0, 2, 4]  # random directions are far apart: their labels stay one-hot
    torch.testing.assert_close(targets[alone][:, alone], torch.eye(3), atol=1e-4, rtol=0)
    # row i is the target of caption i over the videos and of video i over the captions: caption i decides both
    similarity = torch.randn(5, 5, generator=generator)
    expected = (F.cross_entropy(10 * similarity, targets) + F.cross_entropy(10 * similarity.T, targets)) / 2
    torch.testing.assert_close(hierarchical_infonce(similarity, torch.tensor(10.0), targets, enhance=False), expected)


def test_hcmi_enhancement_counts_marginal_negatives_twice():
    similarity = torch.tensor([[0.50, 0.45, 0.10], [0.20, 0.60, 0.00], [0.35, 0.10, 0.40]])
    scale = torch.tensor(10.0)
    plain = hierarchical_infonce(similarity, scale, None, enhance=False)
    torch.testing.assert_close(plain, symmetric_infonce(scale * similarity))
    # caption to video: (0, 1) and (2, 0) are within MARGIN of their caption's positive; video to caption: none
    logits = scale * similarity
    boost = torch.zeros(3, 3)
    boost[0, 1] = boost[2, 0] = torch.log(torch.tensor(ENHANCE))
    assert MARGIN == 0.1
    expected = (F.cross_entropy(logits + boost, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(hierarchical_infonce(similarity, scale, None, enhance=True), expected)
    apart = torch.eye(3)  # no negative near its positive: nothing to enhance
    torch.testing.assert_close(hierarchical_infonce(apart, scale, None, True), hierarchical_infonce(apart, scale, None, False))


@pytest.mark.parametrize(("denoising", "enhancement"), [(False, False), (True, False), (False, True), (True, True)])
def test_hcmi_switches_change_only_the_loss(denoising, enhancement, tokens, frames):
    plain = tiny_model("hcmi", label_denoising=False, sample_enhancement=False)
    model = tiny_model("hcmi", label_denoising=denoising, sample_enhancement=enhancement)
    text, video = model.encode_text(tokens), model.encode_video(frames)
    # caption 3 says nearly what caption 0 says: a false negative in the batch (an exact copy would change
    # nothing: two identical rows of the loss sum to the same gradients under either label)
    nudge = 0.05 * F.normalize(torch.randn(text.sentence.shape[1], generator=torch.Generator().manual_seed(0)), dim=0)
    text.sentence[3] = F.normalize(text.sentence[0] + nudge, dim=0).detach()
    with torch.no_grad():
        for m in (model, plain):  # the largest scale, so the untrained model's scores are far from uniform
            m.backbone.logit_scale.fill_(math.log(100.0))
        torch.testing.assert_close(model.score(text, video), plain.score(text, video))
        loss, metrics = model.loss(text, video)
        plain_loss, _ = plain.loss(text, video)
    expected = sum(symmetric_infonce(model.logit_scale() * s) for s in model.similarities(text, video).values())
    torch.testing.assert_close(plain_loss, expected)
    assert set(metrics) == {"loss_frames_words", "loss_clips_phrases", "loss_video_sentence", "logit_scale"}
    assert (loss.item() != pytest.approx(plain_loss.item(), rel=1e-4)) == (denoising or enhancement)


def test_bad_head_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"model.hvp.layers=\[0, 4\]: distinct ViT block indices in \[0, 3\]"):
        tiny_model("hvp", layers=[0, 4])
    with pytest.raises(ConfigError, match="model.head"):
        load_config(None, ["model.head=xclip"])
    with pytest.raises(ConfigError, match="model.hcmi.clip_ratio"):
        load_config(None, ["model.head=hcmi", "model.hcmi.clip_ratio=0"])
    with pytest.raises(ConfigError, match="model.eercf.temporal_layers"):
        load_config(None, ["model.eercf.temporal_layers=0"])
    model = tiny_model("eercf")
    with pytest.raises(ValueError, match="at most 32 frames, got 40"):
        model.encode_video(torch.randn(1, 40, 3, 64, 64))
