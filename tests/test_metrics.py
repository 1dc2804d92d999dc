import numpy as np
import pytest
import torch

from hvd.eval.metrics import (
    NonFiniteScores,
    dual_softmax,
    query_ranks,
    ranks_of_positives,
    retrieval_metrics,
    stage1_metrics,
)


def test_single_caption_ranks_by_hand():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # gt 0 -> rank 1
            [0.8, 0.5, 0.7],  # gt 1 -> rank 3
            [0.1, 0.6, 0.3],  # gt 2 -> rank 2
        ]
    )
    m = retrieval_metrics(sim, torch.tensor([0, 1, 2]))
    assert m["t2v/R1"] == pytest.approx(100 / 3)
    assert m["t2v/MdR"] == 2 and m["t2v/MnR"] == pytest.approx(2.0)
    # v2t: video 0 column [0.9, 0.8, 0.1] gt text 0 -> 1; video 1 [0.1, 0.5, 0.6] gt 1 -> 2; video 2 [0.2, 0.7, 0.3] gt 2 -> 2
    assert m["v2t/R1"] == pytest.approx(100 / 3) and m["v2t/MnR"] == pytest.approx(5 / 3)


def test_multi_caption_v2t_ranks_caption_groups_as_clip4clip():
    # captions 0, 1 describe video 0; caption 2 video 1; captions 3, 4 video 2
    sim = torch.tensor(
        [[0.5, 0.1, 0.2], [0.2, 0.3, 0.1], [0.1, 0.6, 0.3], [0.9, 0.2, 0.7], [0.8, 0.4, 0.1]]
    )
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1, 2, 2]))
    # t2v, one query per caption: 2, 1, 1, 2, 3
    assert m["t2v/R1"] == 40 and m["t2v/MdR"] == 2 and m["t2v/MnR"] == pytest.approx(9 / 5)
    # v2t, groups score their best caption. Video 0: groups 0.5, 0.1, 0.9 -> rank 2 (among single captions
    # it would be 3: 0.9 and 0.8 both beat 0.5). Video 1: 0.3, 0.6, 0.4 -> 1. Video 2: 0.2, 0.3, 0.7 -> 1.
    assert m["v2t/R1"] == pytest.approx(200 / 3) and m["v2t/MdR"] == 1 and m["v2t/MnR"] == pytest.approx(4 / 3)


def test_median_rank_is_numpy_median_of_an_even_count():
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.9, 0.8, 0.2, 0.3], [0.9, 0.8, 0.7, 0.3], [0.9, 0.8, 0.7, 0.6]])
    m = retrieval_metrics(sim, torch.arange(4))  # t2v ranks 1, 2, 3, 4
    assert m["t2v/MdR"] == 2.5 and m["t2v/MnR"] == 2.5


def _clip4clip_metrics(sim: np.ndarray, text_video: np.ndarray) -> dict[str, float]:
    """CLIP4Clip's metrics written out in numpy: sort-based ranks, np.median, v2t over max-pooled groups."""

    def summary(scores: np.ndarray, truth: np.ndarray, prefix: str) -> dict[str, float]:
        order = np.argsort(-scores, axis=1)
        ranks = np.array([np.where(row == t)[0][0] for row, t in zip(order, truth, strict=True)]) + 1
        out = {f"{prefix}R{k}": float(np.mean(ranks <= k) * 100) for k in (1, 5, 10)}
        return out | {f"{prefix}MdR": float(np.median(ranks)), f"{prefix}MnR": float(np.mean(ranks))}

    videos = sim.shape[1]
    grouped = np.full((videos, videos), -np.inf)
    for caption, video in enumerate(text_video):
        grouped[video] = np.maximum(grouped[video], sim[caption])
    return summary(sim, text_video, "t2v/") | summary(grouped.T, np.arange(videos), "v2t/")


def test_matches_clip4clip_on_random_multi_caption_matrices():
    generator = np.random.default_rng(0)
    for videos in (40, 200):
        text_video = np.concatenate([np.full(generator.integers(1, 6), v) for v in range(videos)])
        sim = generator.standard_normal((len(text_video), videos)).astype(np.float32)  # no ties
        ours = retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(text_video))
        assert ours == pytest.approx(_clip4clip_metrics(sim, text_video), abs=1e-9)


def test_a_video_without_captions_is_an_error():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_ties_are_pessimistic():
    sim = torch.zeros(4, 4)
    ranks = ranks_of_positives(sim, torch.eye(4, dtype=torch.bool))
    assert ranks.tolist() == [4, 4, 4, 4]
    assert retrieval_metrics(sim, torch.arange(4))["t2v/R1"] == 0


def test_dsl_is_reported_separately_and_can_change_ranks():
    # video 0 is a "hub": every text likes it; DSL discounts it
    sim = torch.tensor([[0.50, 0.10, 0.10], [0.55, 0.52, 0.10], [0.56, 0.10, 0.53]])
    plain = retrieval_metrics(sim, torch.tensor([0, 1, 2]))
    both = retrieval_metrics(sim, torch.tensor([0, 1, 2]), dsl=True)
    assert {k: both[k] for k in plain} == plain
    assert plain["t2v/R1"] == pytest.approx(100 / 3) and both["t2v/dsl_R1"] == 100
    expected = sim * torch.softmax(sim * 100, dim=0)
    torch.testing.assert_close(dual_softmax(sim), expected)


def test_query_without_ground_truth_is_an_error():
    with pytest.raises(ValueError, match="ground-truth"):
        ranks_of_positives(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


def test_v2t_can_come_from_its_own_matrix():
    # two-stage reranks each direction on its own: v2t reads [videos, texts] scores, not sim.T
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8]])  # t2v: both rank 1
    v2t = torch.tensor([[0.1, 0.9], [0.7, 0.3]])  # v2t: video 0 ranks caption 0 second, video 1 caption 1 second
    ranks = query_ranks(sim, torch.tensor([0, 1]), v2t)
    assert ranks["t2v"].tolist() == [1, 1] and ranks["v2t"].tolist() == [2, 2]
    m = retrieval_metrics(sim, torch.tensor([0, 1]), v2t_sim=v2t)
    assert m["t2v/R1"] == 100 and m["v2t/R1"] == 0
    assert retrieval_metrics(sim, torch.tensor([0, 1]), v2t_sim=sim.T) == retrieval_metrics(sim, torch.tensor([0, 1]))


def test_dsl_v2t_normalises_over_the_video_queries():
    # caption 0 is a "hub" that every video likes; v2t DSL discounts it, over the video queries
    sim = torch.tensor([[0.50, 0.55, 0.56], [0.10, 0.52, 0.10], [0.10, 0.10, 0.53]])
    m = retrieval_metrics(sim, torch.tensor([0, 1, 2]), dsl=True)
    assert m["v2t/R1"] == pytest.approx(100 / 3) and m["v2t/dsl_R1"] == 100


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_refused_not_ranked(bad):
    # `sim >= NaN` is false: an all-NaN matrix used to rank every positive first, R@1 100.
    with pytest.raises(NonFiniteScores, match="not finite"):
        retrieval_metrics(torch.full((3, 3), bad), torch.arange(3))
    one_bad = torch.eye(3)
    one_bad[2, 0] = bad
    with pytest.raises(NonFiniteScores, match="1 NaN" if bad != bad else "1 infinite"):
        retrieval_metrics(one_bad, torch.arange(3))


def test_non_finite_video_to_text_scores_are_refused_too():
    with pytest.raises(NonFiniteScores, match="video-to-text"):
        retrieval_metrics(torch.eye(3), torch.arange(3), v2t_sim=torch.full((3, 3), float("nan")))


def test_stage1_recall_of_the_ground_truth_and_of_the_full_scores_top1_by_hand():
    # 4 captions over a 30-video gallery; caption i describes video i. Stage 1 ranks video 29 first for
    # everyone, then videos in index order; caption 3's ground truth ties video 20 (pessimistic: rank below it).
    coarse = torch.linspace(1.0, 0.0, 30).repeat(4, 1)
    coarse[:, 29] = 2.0
    coarse[3, 3] = coarse[3, 20]
    text_video = torch.arange(4)
    full = torch.zeros(4, 30)
    full[torch.arange(4), torch.tensor([29, 5, 12, 25])] = 1.0  # the full score's top-1 of each caption
    found = stage1_metrics(coarse, text_video, full)
    # ground truth ranks: 2, 3, 4 and 22 (caption 3's video 3 sits after videos 29, 0..20 less itself and 3's tie)
    assert found["stage1/gt_R10"] == found["stage1/gt_R20"] == 75.0
    # full top-1 ranks: 1, 7, 14, 27
    assert (found["stage1/full_top1_R10"], found["stage1/full_top1_R20"]) == (50.0, 75.0)
    assert set(found) == {"stage1/gt_R10", "stage1/gt_R20", "stage1/full_top1_R10", "stage1/full_top1_R20"}
    assert set(stage1_metrics(coarse, text_video)) == {"stage1/gt_R10", "stage1/gt_R20"}  # no full scores given


def test_stage1_scores_must_be_finite():
    coarse = torch.zeros(2, 30)
    coarse[0, 3] = float("nan")
    with pytest.raises(NonFiniteScores, match="stage-1"):
        stage1_metrics(coarse, torch.arange(2))
