"""HVD in the paper's order (`model.hvd.pfcm_scope=pair`): PFCM per (caption, video) pair over the patches of the
frames FFSM kept for that caption, checked against a loop that compresses each pair on its own."""

import pytest
import torch
import torch.nn.functional as F

from hvd.config import HVDHeadConfig, ModelConfig
from hvd.model import build_model
from hvd.model.ffsm import select_frames
from hvd.model.heads.base import trim_padding, words_entities

FRAMES = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(head="hvd", hvd=HVDHeadConfig(pfcm_scope="pair"))).eval()


@pytest.fixture(scope="module")
def features(model, tokens, frames):
    mask = torch.arange(FRAMES) < torch.tensor([[6], [3], [6], [5]])  # two videos with padding frames
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_video(frames, mask)


def reference_words_patches(model, text, video) -> torch.Tensor:
    """[Nt, Nv]: every pair alone, its kept frames' patches (in time order, no padding) through PFCM."""
    head = model.head
    kept = select_frames(text.sentence, video.frames, head.frame_keep, video.frame_mask)
    patches = video.patches.unflatten(1, (FRAMES, -1))  # the raw patches the video kept: [Nv, T, N, D]
    scores = torch.zeros(kept.shape[:2])
    for t in range(kept.shape[0]):
        words, word_mask = trim_padding(text.words[t : t + 1], text.word_mask[t : t + 1])
        for v in range(kept.shape[1]):
            tokens = patches[v, kept[t, v]].flatten(0, 1)[None]
            entities = F.normalize(head.pfcm(tokens)[0].float(), dim=-1)
            seen = torch.ones(1, 1, entities.shape[1], dtype=torch.bool)
            scores[t, v] = words_entities(words, word_mask, head.word_weight(words).squeeze(-1), entities, seen,
                                          head.patch_weight(entities).squeeze(-1))[0, 0]
    return scores


def test_pair_scope_scores_each_pair_as_a_loop_over_pairs_would(model, features):
    text, video = features
    assert video.patches.shape[1] == FRAMES * 16  # raw patches kept per video: each pair compresses its own
    with torch.no_grad():
        parts = model.similarities(text, video)
        reference = reference_words_patches(model, text, video)
    torch.testing.assert_close(parts["words_patches"], reference, rtol=1e-4, atol=1e-5)
    # entities depend on the caption: the same video compressed for two captions that keep other frames
    kept = select_frames(text.sentence, video.frames, model.head.frame_keep, video.frame_mask)
    assert any(not torch.equal(kept[0, v], kept[t, v]) for t in range(1, 4) for v in range(4))


def test_reranking_and_chunked_scoring_give_the_matrix_scores(model, features):
    text, video = features
    with torch.no_grad():
        whole = model.combine(model.similarities(text, video))
        # each caption with its own candidate videos, and each video with its own candidate captions
        candidates = torch.tensor([[2, 0], [1, 3], [3, 2], [0, 1]])
        by_caption = model.combine(model.head.grouped_similarities(text, video.map(lambda t: t[candidates])))
        by_video = model.combine(model.head.grouped_similarities(text.map(lambda t: t[candidates]), video))
    torch.testing.assert_close(by_caption, whole.gather(1, candidates), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(by_video, whole.T.gather(1, candidates), rtol=1e-4, atol=1e-5)
    chunked = build_model(ModelConfig(head="hvd", hvd=HVDHeadConfig(pfcm_scope="pair"), score_budget_mb=1))
    chunked.load_state_dict(model.state_dict())
    torch.testing.assert_close(chunked.eval().score(text, video), whole, rtol=1e-5, atol=1e-6)


def test_pair_scope_trains_its_compression_through_every_pair(tokens, frames):
    torch.manual_seed(0)
    model = build_model(ModelConfig(head="hvd", hvd=HVDHeadConfig(pfcm_scope="pair")))
    pixels = torch.randint(0, 256, (4, FRAMES, 64, 64, 3), dtype=torch.uint8)
    loss, metrics = model(tokens, pixels, torch.arange(FRAMES) < torch.tensor([[6], [3], [6], [5]]))
    loss.backward()
    assert set(metrics) == {"loss_sentence_frames", "loss_words_patches", "logit_scale"}
    assert torch.isfinite(loss)
    for name, parameter in model.head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_explain_shows_the_kept_frames_clustered_together(model, tokens, frames):
    with torch.no_grad():
        sentence = model.encode_text(tokens[:1]).sentence[0]
        pooled, patches, _ = model.backbone.encode_images(frames[0], with_patches=True)
        shown = model.head.explain(sentence, F.normalize(pooled.float(), dim=-1), patches.float(),
                                   torch.ones(FRAMES, dtype=torch.bool))
    assert int(shown["kept"].sum()) == 3  # half of 6 frames
    assert bool((shown["entities"][~shown["kept"]] == -1).all()) and bool((shown["entities"][shown["kept"]] >= 0).all())
