"""Two-stage retrieval: stage-1 candidates, stage-2 rescoring, and the merge, against exhaustive scoring."""

from __future__ import annotations

import functools

import pytest
import torch

from hvd.config import HVDHeadConfig, ModelConfig
from hvd.eval.metrics import query_ranks, retrieval_metrics
from hvd.eval.retrieval import (
    exhaustive,
    frame_scores,
    mean_of_best_frames,
    merge_reranked,
    rescore_texts,
    rescore_videos,
    stage1_videos,
    top_candidates,
    two_stage,
)
from hvd.model import build_model, build_tokenizer

COLOURS, SHAPES, MOTIONS = ("red", "blue", "green"), ("circle", "square"), ("rises", "falls")
CAPTIONS = [f"a {c} {s} {m}" for c in COLOURS for s in SHAPES for m in MOTIONS]  # 12 captions


@functools.cache
def encoded(head: str, **hvd_keys: str):
    """A tiny model and 12 captions x 10 videos (random frames); captions 10, 11 describe videos 0, 1."""
    torch.manual_seed(0)
    cfg = ModelConfig(head=head, hvd=HVDHeadConfig(**hvd_keys))
    model = build_model(cfg).eval()
    tokens = build_tokenizer(cfg, max_words=16)(CAPTIONS)
    with torch.no_grad():
        text = model.encode_text(tokens)
        video = model.encode_video(torch.randn(10, 6, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    return model, text, video, torch.tensor([*range(10), 0, 1])


@pytest.mark.parametrize("head", ["hvd", "meanp", "xpool", "eercf", "hvp", "hcmi"])
def test_topk_of_the_whole_gallery_equals_exhaustive(head):
    model, text, video, text_video = encoded(head)
    full = exhaustive(model, text, video)
    threads = torch.get_num_threads()
    both = two_stage(model, text, video, topk=max(len(text), len(video)))
    assert torch.get_num_threads() == threads  # stage 2 runs on one CPU thread, then gives the rest back
    # The same pairs through the same scoring code, in other batches: equal up to float summation order,
    # and ranked identically.
    torch.testing.assert_close(both.t2v, full.t2v, rtol=0, atol=1e-6)
    torch.testing.assert_close(both.v2t, full.v2t, rtol=0, atol=1e-6)
    assert torch.equal(both.t2v.argsort(dim=1), full.t2v.argsort(dim=1))
    assert torch.equal(both.v2t.argsort(dim=1), full.v2t.argsort(dim=1))
    assert torch.equal(both.rescored, torch.ones(len(text), len(video), dtype=torch.bool))
    assert retrieval_metrics(both.t2v, text_video, v2t_sim=both.v2t) == retrieval_metrics(
        full.t2v, text_video
    )
    assert set(both.timings_s) == {"stage1_s", "stage2_s"} and set(full.timings_s) == {"exhaustive_s"}


@pytest.mark.parametrize("scope", ["video", "pair"])
@pytest.mark.parametrize("rule", ["above_mean", "near_best"])
def test_hvd_adaptive_frame_selection_reranks_as_it_scores_exhaustively(rule, scope):
    model, text, video, _ = encoded("hvd", frame_select=rule, pfcm_scope=scope)
    full = exhaustive(model, text, video)
    both = two_stage(model, text, video, topk=max(len(text), len(video)))
    torch.testing.assert_close(both.t2v, full.t2v, rtol=0, atol=1e-6)
    torch.testing.assert_close(both.v2t, full.v2t, rtol=0, atol=1e-6)
    share = exhaustive(encoded("hvd", pfcm_scope=scope)[0], text, video)  # the same weights, the paper's rule
    assert not torch.allclose(share.t2v, full.t2v)


def test_merge_puts_candidates_first_by_fine_score_then_the_rest_by_coarse_score():
    coarse = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.2], [0.0, 0.8, 0.7, 0.6, 0.9]])
    candidates = torch.tensor([[0, 2], [4, 1]])
    fine = torch.tensor([[-5.0, -4.0], [3.0, 7.0]])  # fine scores on another scale, below the coarse ones
    merged = merge_reranked(coarse, candidates, fine)
    assert merged.argsort(dim=1, descending=True).tolist() == [[2, 0, 3, 4, 1], [1, 4, 2, 3, 0]]
    assert merged[0, 2] == -4.0 and merged[1, 1] == 7.0  # candidates keep their fine scores


def test_ground_truth_outside_the_top_k_keeps_its_stage1_rank():
    model, text, video, text_video = encoded("hvd")
    topk = 3
    result = two_stage(model, text, video, topk)
    sentence, pooled = model.global_embeddings(text, video)
    coarse = sentence @ pooled.T
    stage1 = query_ranks(coarse, text_video)["t2v"]
    final = query_ranks(result.t2v, text_video, result.v2t)["t2v"]
    inside = stage1 <= topk
    assert bool(inside.any()) and bool((~inside).any())  # the example exercises both cases
    assert torch.equal(final[~inside], stage1[~inside])
    assert bool((final[inside] <= topk).all())
    assert torch.equal(
        result.rescored, torch.zeros_like(result.rescored).scatter_(1, top_candidates(coarse, topk), True)
    )


def test_meanp_two_stage_matches_exhaustive_at_any_k():
    # meanP's full score is the stage-1 score itself, so reranking can change nothing
    model, text, video, text_video = encoded("meanp")
    expected = retrieval_metrics(exhaustive(model, text, video).t2v, text_video)
    for topk in (1, 4):
        result = two_stage(model, text, video, topk)
        assert retrieval_metrics(result.t2v, text_video, v2t_sim=result.v2t) == expected


def test_mean_of_best_frames_counts_real_frames_only():
    cosines = torch.tensor([[0.9, 0.2, 0.5, 1.0], [0.3, 0.1, 0.9, 0.9]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])  # 1.0 and 0.9s are padding
    assert torch.allclose(mean_of_best_frames(cosines, mask, 2), torch.tensor([0.7, 0.3]))
    assert torch.allclose(mean_of_best_frames(cosines, mask, 1), torch.tensor([0.9, 0.3]))


def test_a_frame_shortlist_recovers_a_short_event_the_mean_frame_ranks_last():
    """Video 0 shows the caption's event in one frame of six; videos 1-3 are near it in every frame. The mean frame
    ranks video 0 last; re-ranking a shortlist of all four by their best frame puts it first, and stage 2 gets it."""
    model, text, video, _ = encoded("meanp")
    sentence = model.text_embeddings(text[:1])
    event, clutter = sentence[0], torch.nn.functional.normalize(torch.randn(sentence.shape[1]), dim=0)
    near = [torch.nn.functional.normalize(event + w * clutter, dim=0).expand(6, -1) for w in (1.5, 2.0, 2.5)]
    frames = torch.stack([torch.stack([event] + [-event] * 5), *near])
    gallery = video[:4]
    gallery.frames = frames.to(gallery.frames.dtype)
    coarse = sentence @ model.video_embeddings(gallery).T
    assert coarse.argmax().item() != 0 and coarse.argmin().item() == 0
    stage1 = stage1_videos(model, sentence, gallery, coarse, topk=1, shortlist=4, top_frames=1)
    assert stage1.candidates.tolist() == [[0]] and stage1.ranking().argmax().item() == 0
    assert stage1.merged(torch.tensor([[-9.0]])).argsort(descending=True).tolist() == [[0, 1, 2, 3]]
    plain = stage1_videos(model, sentence, gallery, coarse, topk=1)  # shortlist off: stage 1 as before
    assert plain.ranking() is coarse and plain.candidates.tolist() == [[1]]


@pytest.mark.parametrize("head", ["eercf", "hcmi"])
def test_heads_with_their_own_stage1_embeddings_refuse_a_frame_shortlist(head):
    model, text, video, _ = encoded(head)
    assert not model.head.stage1_is_mean_frame
    with pytest.raises(ValueError, match="eval.shortlist=0"):
        two_stage(model, text, video, topk=2, shortlist=5)
    two_stage(model, text, video, topk=2)  # without it, as before


@pytest.mark.parametrize("head", ["hvd", "xpool"])
def test_frame_shortlist_sends_stage2_its_top_k_and_ranks_the_shortlist_above_the_rest(head):
    model, text, video, _ = encoded(head)
    topk, shortlist = 2, 5
    result = two_stage(model, text, video, topk, shortlist=shortlist, top_frames=2)
    sentence, pooled = model.global_embeddings(text, video)
    coarse = sentence @ pooled.T
    listed = top_candidates(coarse, shortlist)
    framed = frame_scores(sentence, model.frame_embeddings(video), video.frame_mask, listed, 2)
    # the frame scores, one caption and one video at a time
    cosines = torch.einsum("qd,vtd->qvt", sentence, model.frame_embeddings(video))
    expected = mean_of_best_frames(cosines, video.frame_mask[None], 2).gather(1, listed)
    torch.testing.assert_close(framed, expected)
    chosen = listed.gather(1, framed.topk(topk).indices)
    assert torch.equal(result.rescored, torch.zeros_like(result.rescored).scatter_(1, chosen, True))
    order = result.coarse.argsort(dim=1, descending=True)
    assert torch.equal(order[:, :shortlist].sort(dim=1).values, listed.sort(dim=1).values)
    assert torch.equal(order[:, shortlist:].sort(dim=1).values,
                       coarse.scatter(1, listed, float("-inf")).argsort(dim=1, descending=True)[:, :-shortlist]
                       .sort(dim=1).values)
    final = result.t2v.argsort(dim=1, descending=True)
    assert torch.equal(final[:, :topk].sort(dim=1).values, chosen.sort(dim=1).values)


@pytest.mark.parametrize("head", ["hvd", "meanp", "xpool", "eercf", "hvp", "hcmi"])
def test_batched_reranking_equals_one_query_at_a_time(head):
    """Heads that score groups rerank every query's candidates in chunked passes; the scores and rankings
    are those of one `score` call per query (the path of the other heads)."""
    model, text, video, _ = encoded(head)
    assert model.head.scores_groups
    coarse = torch.randn(len(text), len(video), generator=torch.Generator().manual_seed(2))
    videos_of_text, texts_of_video = top_candidates(coarse, 4), top_candidates(coarse.T, 5)
    one_by_one = torch.stack([model.score(text[q : q + 1], video[videos_of_text[q]])[0] for q in range(len(text))])
    one_by_one_v2t = torch.stack(
        [model.score(text[texts_of_video[q]], video[q : q + 1])[:, 0] for q in range(len(video))]
    )
    budget, model.score_budget_bytes = model.score_budget_bytes, 1  # one query per chunk: chunking changes nothing
    try:
        batched = (rescore_videos(model, text, video, videos_of_text), rescore_texts(model, text, video, texts_of_video))
    finally:
        model.score_budget_bytes = budget
    for scores, reference in zip(batched, (one_by_one, one_by_one_v2t), strict=True):
        torch.testing.assert_close(scores, reference, rtol=0, atol=1e-6)
        assert torch.equal(scores.argsort(dim=1), reference.argsort(dim=1))


@functools.cache
def padded(head: str):
    """A tiny model with random head weights (its learned weightings start uniform), 12 random captions of
    3-20 tokens and 10 random videos of 1-6 real frames: padding on both sides."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(head=head)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        lengths = torch.randint(3, 21, (12, 1), generator=generator)
        positions = torch.arange(24)
        tokens = torch.randint(1, 49406, (12, 24), generator=generator)  # words: below the start and end ids
        tokens = torch.where(positions == lengths - 1, 49407, tokens).masked_fill(positions >= lengths, 0)
        tokens[:, 0] = 49406
        frame_mask = torch.arange(6) < torch.randint(1, 7, (10, 1), generator=generator)
        frames = torch.randn(10, 6, 3, 64, 64, generator=generator)
        return model, model.encode_text(tokens), model.encode_video(frames, frame_mask)


def candidates_of(queries: int, gallery: int, k: int, seed: int) -> torch.Tensor:
    """[queries, k] distinct random candidates per query."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(gallery, generator=generator)[:k] for _ in range(queries)])


@pytest.mark.parametrize("name", ["hcmi", "hvp"])
@pytest.mark.parametrize(("queries", "k"), [(1, 1), (4, 3), (10, 8)])
def test_grouped_similarities_equal_one_similarities_call_per_query(name, queries, k):
    """Each part's [Q, k] scores, captions and videos prepared once for the whole set (HCMI's phrases, HVP-Net's
    word, frame and entity weights), against `similarities` of one query with its candidates, both directions."""
    model, text, video = padded(name)
    head = model.head
    with torch.no_grad():
        text_side, video_side = head.text_features(text), head.video_side(video)
        videos_of_text, texts_of_video = candidates_of(queries, len(video), k, 0), candidates_of(queries, len(text), k, 1)
        by_caption = head.grouped_similarities(text_side[:queries], video_side[videos_of_text])
        by_video = head.grouped_similarities(text_side[texts_of_video], video_side[:queries])
        for q in range(queries):
            for name, s in head.similarities(text[q : q + 1], video[videos_of_text[q]]).items():
                torch.testing.assert_close(by_caption[name][q], s[0], rtol=0, atol=1e-6)
            for name, s in head.similarities(text[texts_of_video[q]], video[q : q + 1]).items():
                torch.testing.assert_close(by_video[name][q], s[:, 0], rtol=0, atol=1e-6)


def test_hcmi_text_side_once_per_caption_scores_as_each_pair_alone():
    """Phrases clustered once for all captions are each caption's own, and the reranking harness (which
    prepares the captions once) scores every (caption, candidate) pair as that pair scored alone."""
    model, text, video = padded("hcmi")
    head = model.head
    with torch.no_grad():
        prepared = head.text_features(text)
        assert head.text_features(prepared) is prepared
        for c in range(len(text)):
            alone = head.text_features(text[c : c + 1])
            slots = alone.phrases.shape[1]
            assert torch.equal(prepared.phrase_mask[c, :slots], alone.phrase_mask[0])
            assert not prepared.phrase_mask[c, slots:].any()
            torch.testing.assert_close(prepared.phrases[c, :slots], alone.phrases[0], rtol=0, atol=1e-6)
        assert bool((prepared.phrase_mask.sum(dim=1) < prepared.phrases.shape[1]).any())  # phrase padding exercised
        videos_of_text, texts_of_video = candidates_of(len(text), len(video), 5, 2), candidates_of(len(video), len(text), 5, 3)
        pair = lambda c, v: model.combine(head.similarities(text[c : c + 1], video[v : v + 1]))[0, 0]  # noqa: E731
        by_caption = torch.tensor([[pair(c, int(v)) for v in row] for c, row in enumerate(videos_of_text)])
        by_video = torch.tensor([[pair(int(c), v) for c in row] for v, row in enumerate(texts_of_video)])
        torch.testing.assert_close(model.score_groups(text, video, videos_of_text, videos_of_text=True), by_caption,
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(model.score_groups(text, video, texts_of_video, videos_of_text=False), by_video,
                                   rtol=0, atol=1e-6)


def test_hvp_reranking_derives_each_video_side_once_per_video():
    """HVP-Net's frame and entity weights depend on the video alone: reranking runs their networks once per
    gallery video (not once per caption-candidate pair) and once per caption for the words, and scores as the
    exhaustive matrix does."""
    model, text, video = padded("hvp")
    matcher = model.head.matcher
    rows = {}
    hooks = [net.register_forward_hook(lambda module, inputs, output, name=name: rows.__setitem__(
        name, rows.get(name, 0) + inputs[0].shape[:-1].numel())) for name, net in
        (("frames", matcher.frame_weight), ("entities", matcher.patch_weight), ("words", matcher.word_weight))]
    videos_of_text = candidates_of(len(text), len(video), 5, 4)  # 60 pairs over 10 videos
    try:
        scores = rescore_videos(model, text, video, videos_of_text)
    finally:
        for hook in hooks:
            hook.remove()
    blocks, frames, entities = len(model.head.vision_layers), video.frames.shape[1], video.patches.shape[1]
    assert rows["frames"] == len(video) * blocks * frames and rows["entities"] == len(video) * entities
    assert rows["words"] == len(text) * model.head.text_features(text).words.shape[1]
    with torch.no_grad():
        full = model.score(text, video)
    torch.testing.assert_close(scores, full.gather(1, videos_of_text), rtol=0, atol=1e-6)


def test_hcmi_two_stage_ranks_as_when_it_reranked_one_query_at_a_time():
    """The evaluation path: two-stage retrieval with HCMI's grouped reranking gives the rankings that one `score`
    call per query (HCMI's path before it scored groups) gave, both directions."""
    model, text, video = padded("hcmi")
    topk = 4
    result = two_stage(model, text, video, topk)
    coarse = result.coarse
    videos_of_text, texts_of_video = top_candidates(coarse, topk), top_candidates(coarse.T, topk)
    one_by_one = torch.stack([model.score(text[q : q + 1], video[videos_of_text[q]])[0] for q in range(len(text))])
    one_by_one_v2t = torch.stack([model.score(text[texts_of_video[q]], video[q : q + 1])[:, 0] for q in range(len(video))])
    before = merge_reranked(coarse, videos_of_text, one_by_one), merge_reranked(coarse.T, texts_of_video, one_by_one_v2t)
    for now, then in zip((result.t2v, result.v2t), before, strict=True):
        torch.testing.assert_close(now, then, rtol=0, atol=1e-6)
        assert torch.equal(now.argsort(dim=1, descending=True), then.argsort(dim=1, descending=True))
