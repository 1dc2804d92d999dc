"""The tiny HVD and meanP models: features, FFSM, PFCM, pairwise scores, gradients, precision, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_CAPTIONS as CAPTIONS
from conftest import MODEL_FRAMES as FRAMES

from hvd.config import ModelConfig, replace_keys
from hvd.model import TextFeatures, VideoFeatures, build_model, build_tokenizer
from hvd.model.clustering import keep_count
from hvd.model.ffsm import keep_frames, select_frames
from hvd.model.pfcm import PFCM


def tiny_model(head: str = "hvd", seed: int = 0, **knobs):
    """A tiny model of `head`; each knob a `ModelConfig` field or one of the head's own (`pfcm_scope=...`)."""
    torch.manual_seed(seed)
    top = {name: value for name, value in knobs.items() if hasattr(ModelConfig, name)}
    own = {f"{head}.{name}": value for name, value in knobs.items() if name not in top}
    return build_model(replace_keys(ModelConfig(head=head), top | own))


def test_features_have_the_documented_shapes_and_unit_norms(tokens, frames):
    model = tiny_model(pfcm_scope="frame")
    text, video = model.encode_text(tokens), model.encode_video(frames)
    assert model.image_size == 64
    assert text.sentence.shape == (4, 128) and text.words.shape == (4, 32, 128)
    assert torch.equal(text.word_mask, tokens != 0)
    assert video.frames.shape == (4, FRAMES, 128) and video.frame_mask.all()
    assert video.patches.shape == (4, FRAMES * 2, 128)  # 16 patches per frame, halved 3 times
    one_frame_each = torch.eye(FRAMES, dtype=torch.bool).repeat_interleave(2, dim=0)
    assert torch.equal(video.patch_frames, one_frame_each.expand(4, -1, -1))
    for unit in (text.sentence, text.words, video.frames, video.patches):
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(unit.shape[:-1]))
    meanp = tiny_model("meanp").encode_video(frames)
    assert meanp.patches.shape == (4, 0, 128) and meanp.patch_frames.shape == (4, 0, FRAMES)


def test_the_fine_patch_preset_gives_pfcm_sixty_four_patches_per_frame(tokens, frames):
    model = tiny_model(preset="tiny-p8", pfcm_scope="frame")
    patches = model.backbone.encode_images(frames[0], with_patches=True)[1]
    assert patches.shape == (FRAMES, 64, 128)  # 8 x 8 patches of 8 px
    video = model.encode_video(frames)
    assert video.patches.shape == (4, FRAMES * 8, 128)  # 64 -> 32 -> 16 -> 8 per frame
    assert torch.isfinite(model.score(model.encode_text(tokens), video)).all()


def test_video_scope_entities_span_frames_and_skip_padding(frames):
    mask = torch.arange(FRAMES) < torch.tensor([[6], [6], [3], [1]])
    video = tiny_model(pfcm_scope="video").encode_video(frames, mask)
    assert video.patches.shape == (4, 12, 128)  # 96 patches -> 48 -> 24 -> 12
    valid_entities = video.patch_frames.any(dim=-1).sum(dim=1)
    assert valid_entities.tolist() == [12, 12, 6, 2]  # 48 -> 6 and 16 -> 2 valid patches
    assert not video.patch_frames[~mask[:, None, :].expand_as(video.patch_frames)].any()  # no padding frame
    assert video.patch_frames.sum(dim=-1).amax() > 1  # some entity spans frames


def test_features_slice_move_and_concatenate(tokens):
    text = tiny_model().encode_text(tokens)
    rebuilt = TextFeatures.cat([text[:1], text[1:3], text[3:]]).to("cpu")
    assert len(rebuilt) == 4 and rebuilt.device.type == "cpu"
    for field in dataclasses.fields(TextFeatures):
        assert torch.equal(getattr(rebuilt, field.name), getattr(text, field.name))
    picked = text[torch.tensor([3, 0])]
    assert torch.equal(picked.words[0], text.words[3])


def test_ffsm_keeps_exactly_the_most_similar_frames():
    generator = torch.Generator().manual_seed(0)
    sentence = F.normalize(torch.randn(5, 16, generator=generator), dim=-1)
    frames = F.normalize(torch.randn(3, 12, 16, generator=generator), dim=-1)
    valid = torch.tensor([12, 7, 1])
    mask = torch.arange(12) < valid[:, None]
    kept = select_frames(sentence, frames, keep=0.5, frame_mask=mask)
    assert kept.shape == (5, 3, 12) and kept.sum(dim=-1).eq(torch.tensor([6, 4, 1])).all()
    for t in range(5):
        for v in range(3):
            similarity = frames[v, : valid[v]] @ sentence[t]
            best = set(similarity.argsort(descending=True)[: (int(valid[v]) + 1) // 2].tolist())
            assert set(kept[t, v].nonzero().flatten().tolist()) == best  # never a padding frame
    assert torch.equal(select_frames(sentence, frames, keep=1.0, frame_mask=mask), mask.expand(5, -1, -1))
    assert select_frames(sentence, frames, keep=0.01, frame_mask=mask).sum(dim=-1).eq(1).all()


def test_ffsm_adaptive_rules_keep_the_frames_that_stand_out_however_many():
    brief = torch.tensor([0.1, 0.12, 0.9, 0.85, 0.11, 0.09, 0.1, 0.13, 0.1, 0.12, 0.08, 0.1])  # 2 of 12 show it
    fills = torch.full((12,), 0.7)  # every frame equally similar: all are kept, none lost to rounding
    padded = torch.tensor([0.2, 0.75, 0.3, 0.9, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])  # 4 real frames
    similarity = torch.stack([brief, fills, padded])
    mask = torch.stack([torch.ones(12, dtype=torch.bool)] * 2 + [torch.arange(12) < 4])
    kept = keep_frames(similarity, mask, keep=0.5, rule="above_mean")
    assert kept[0].nonzero().flatten().tolist() == [2, 3]
    assert kept[1].all()
    assert kept[2].nonzero().flatten().tolist() == [1, 3]  # padding never kept, nor counted in the mean
    assert torch.equal(keep_frames(similarity, mask, 0.5, "share").sum(dim=-1), torch.tensor([6, 6, 2]))
    near = keep_frames(similarity, mask, keep=0.5, rule="near_best", margin=0.1)  # within 0.1 of the best cosine
    assert near[0].nonzero().flatten().tolist() == [2, 3] and near[1].all()
    assert near[2].nonzero().flatten().tolist() == [3]  # 0.75 is more than 0.1 below 0.9; padding's 5.0 ignored
    assert keep_frames(similarity, mask, 0.5, "near_best", margin=0.0)[0].nonzero().flatten().tolist() == [2]
    with pytest.raises(ValueError, match="rule 'top'.*share"):
        keep_frames(similarity, mask, 0.5, "top")


@pytest.mark.parametrize("padded", [False, True])
def test_pfcm_halves_the_tokens_every_round(padded):
    torch.manual_seed(0)
    pfcm = PFCM(dim=64, steps=3, ratio=0.5, k=3)
    x = torch.randn(2, 64, 64)
    mask = torch.arange(64) < torch.tensor([[64], [40]]) if padded else None
    counts = []
    for step in pfcm.rounds:
        x, mask, _ = step(x, mask)
        counts.append(x.shape[1])
        assert torch.isfinite(x).all()
    assert counts == [32, 16, 8]
    if padded:
        assert mask.sum(dim=1).tolist() == [8, 5]  # 40 -> 20 -> 10 -> 5


@pytest.mark.parametrize("scope", ["frame", "video"])
def test_hvd_score_matches_a_per_pair_reference(scope, tokens, frames):
    """One pair at a time: FFSM over the video's real frames, PFCM on the real frames' patches only (each
    kept frame alone, or the whole video at video scope), the entities drawn from kept frames, the score."""
    model = tiny_model(pfcm_scope=scope)
    head = model.head
    valid = [6, 4, 6, 1]
    mask = torch.arange(FRAMES) < torch.tensor(valid)[:, None]
    with torch.no_grad():
        for layer in (head.word_weight, head.patch_weight):  # learned weights, not the uniform start
            torch.nn.init.normal_(layer.weight, std=2.0)
        text, video = model.encode_text(tokens), model.encode_video(frames, mask)
        scores = model.score(text, video)
        _, raw_patches, _ = model.backbone.encode_images(frames.flatten(0, 1), with_patches=True)
        raw_patches = raw_patches.unflatten(0, frames.shape[:2])

        for t in range(len(text)):
            words = text.words[t][text.word_mask[t]]
            word_weight = head.word_weight(words).squeeze(-1).softmax(dim=0)
            for v in range(len(video)):
                similarity = video.frames[v, : valid[v]] @ text.sentence[t]
                kept = similarity.argsort(descending=True)[: keep_count(valid[v], 0.5)]
                sentence_frames = text.sentence[t] @ F.normalize(video.frames[v, kept].mean(dim=0), dim=0)
                if scope == "frame":
                    entities = head.pfcm(raw_patches[v, kept])[0].flatten(0, 1)
                else:
                    real = raw_patches[v, : valid[v]]
                    merged, _, assignment = head.pfcm(real.flatten(0, 1)[None])
                    from_kept = assignment.view(real.shape[:2])[kept].unique()
                    entities = merged[0, from_kept]
                entities = F.normalize(entities, dim=-1)
                word_patch = words @ entities.T
                patch_weight = head.patch_weight(entities).squeeze(-1).softmax(dim=0)
                text_to_video = (word_patch.amax(dim=1) * word_weight).sum()
                video_to_text = (word_patch.amax(dim=0) * patch_weight).sum()
                expected = sentence_frames + (text_to_video + video_to_text) / 2
                torch.testing.assert_close(scores[t, v], expected, rtol=1e-4, atol=2e-5)


def random_features(
    texts: int, videos: int, words: int = 32, frames: int = 6, patches: int = 2, dim: int = 128, views: int = 0,
    blocks: int = 1,
):
    generator = torch.Generator().manual_seed(1)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, dim, generator=generator), dim=-1)

    lengths = torch.randint(3, words + 1, (texts, 1), generator=generator)
    text = TextFeatures(unit(texts), unit(texts, words), torch.arange(words) < lengths)
    frame_mask = torch.arange(frames) < torch.randint(1, frames + 1, (videos, 1), generator=generator)
    one_block = torch.eye(frames, dtype=torch.bool).repeat_interleave(patches, dim=0)  # each entity in one frame
    patch_frames = one_block.repeat(blocks, 1) & frame_mask[:, None]
    return text, VideoFeatures(unit(videos, frames), frame_mask, unit(videos, blocks * frames * patches), patch_frames,
                               unit(videos, views, frames))


@pytest.mark.parametrize("head", ["hvd", "meanp", "xpool", "eercf", "hvp", "hcmi"])
def test_chunked_scores_stay_in_budget_and_equal_one_piece_scores(head):
    model = tiny_model(head, score_budget_mb=1).eval()  # scoring is evaluation: no dropout
    shapes = {"eercf": {"views": 1}, "hvp": {"views": 2, "blocks": 3, "patches": 1}, "hcmi": {"views": 1}}.get(head, {})
    text, video = random_features(120, 100, **shapes)
    text_chunk, video_chunk = model.chunk_sizes(text, video)
    assert text_chunk * video_chunk * model.head.pair_bytes(text, video) <= 2**20
    if head != "meanp":
        assert text_chunk < 120 and video_chunk < 100  # the budget forces chunks both ways
    scores = model.score(text, video)
    with torch.no_grad():
        whole = model.combine(model.similarities(text, video))
    torch.testing.assert_close(scores, whole, rtol=1e-5, atol=1e-6)


def test_global_embeddings_reproduce_the_meanp_score_and_ignore_padding(tokens, frames):
    model = tiny_model("meanp")
    mask = torch.arange(FRAMES) < torch.tensor([[6], [2], [6], [1]])
    text, video = model.encode_text(tokens), model.encode_video(frames, mask)
    t, v = model.global_embeddings(text, video)
    torch.testing.assert_close(model.score(text, video), t @ v.T)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    only_real = model.encode_video(frames[1:2, :2])  # the padded video's real frames alone
    torch.testing.assert_close(v[1], model.global_embeddings(text, only_real)[1][0], rtol=1e-5, atol=1e-6)


HEAD_LOSSES = {
    "hvd": {"loss_sentence_frames", "loss_words_patches"},
    "meanp": {"loss_sentence_video"},
    "xpool": {"loss_sentence_pooled"},
    "eercf": {"loss_weak", "loss_strong", "loss_pearson"},
    "hvp": {f"loss_block{b}_{n}" for b in (0, 1, 3) for n in ("sentence_frames", "sentence_patches", "words_patches")},
    "hcmi": {"loss_frames_words", "loss_clips_phrases", "loss_video_sentence"},
}


@pytest.mark.parametrize(("head", "knobs"), [("hvd", {"pfcm_scope": "frame"}), ("hvd", {"pfcm_scope": "video"}),
                                             *((head, {}) for head in ("meanp", "xpool", "eercf", "hvp", "hcmi"))])
def test_gradients_reach_the_backbone_and_every_new_module(head, knobs, tokens, frames):
    model = tiny_model(head, **knobs)
    pixels = torch.randint(0, 256, (len(CAPTIONS), FRAMES, 64, 64, 3), dtype=torch.uint8)
    mask = torch.arange(FRAMES) < torch.tensor([[6], [3], [6], [5]])
    loss, metrics = model(tokens, pixels, mask)  # forward: the loss from uint8 frames, as DDP calls it
    loss.backward()
    expected = HEAD_LOSSES[head]
    assert set(metrics) == expected | {"logit_scale"}
    assert loss.item() == pytest.approx(sum(metrics[name] for name in expected), rel=1e-6)
    fixed = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert fixed == {"backbone.clip.visual.positional_embedding"}  # the tiny preset's 2-D sin-cos positions
    for name, parameter in model.named_parameters():
        if name in fixed:
            continue
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_or_inf(dtype, tokens, frames):
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        text, video = model.encode_text(tokens), model.encode_video(frames)
        loss, _ = model.loss(text, video)
        loss.backward()
        scores = model.score(text, video)
    assert torch.isfinite(loss) and torch.isfinite(scores).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_tokenizer_context_is_the_shorter_of_max_words_and_the_preset():
    assert build_tokenizer(ModelConfig(), 20)(CAPTIONS).shape == (4, 20)
    assert build_tokenizer(ModelConfig(), 100)(CAPTIONS).shape == (4, 32)
    assert build_tokenizer(ModelConfig(preset="ViT-B-32"), 100)(CAPTIONS).shape == (4, 77)
    with pytest.raises(ValueError, match="data.max_words"):
        build_tokenizer(ModelConfig(), 2)


def test_bad_input_is_a_clear_error(tokens, frames):
    model = tiny_model("meanp")
    with pytest.raises(ValueError, match=r"frames must be \[N, 3, 64, 64\].*\[24, 3, 32, 32\]"):
        model.encode_video(frames[:, :, :, :32, :32])
    with pytest.raises(ValueError, match=r"frames must be normalised floats \[batch, time.*\[6, 3, 64, 64\]"):
        model.encode_video(frames[0])
    with pytest.raises(ValueError, match="torch.uint8"):
        model.encode_video(frames.to(torch.uint8))
    with pytest.raises(ValueError, match="frame_mask must be bool \\[4, 6\\] with a valid frame per video"):
        model.encode_video(frames, torch.arange(FRAMES) < torch.tensor([[6], [0], [6], [6]]))
    with pytest.raises(ValueError, match="model.hvd.pfcm_scope.*'clip'.*frame, video"):
        tiny_model(pfcm_scope="clip")
    with pytest.raises(ValueError, match="at least one token"):
        model.encode_text(torch.cat([tokens[:1], torch.zeros_like(tokens[:1])]))
    with pytest.raises(ValueError, match="length <= 32"):
        model.encode_text(torch.ones(2, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="model.hvd.frame_keep"):
        tiny_model(frame_keep=0.0)
    with pytest.raises(ValueError, match="model.preset"):
        build_model(ModelConfig(preset="ViT-H-14"))
