"""DPC-KNN against a plain loop-based reference written from the method's description, and cluster merging."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from hvd.model.clustering import dpc_knn, keep_count, merge_clusters, tie_break_priority


def reference_dpc_knn(x: torch.Tensor, valid: list[bool], ratio: float, k: int, seed: int = 0):
    """One item, float64, one token at a time: (centre token indices in rank order, cluster of every valid token)."""
    rows = x.double().tolist()
    channels = len(rows[0])
    tokens = [i for i, ok in enumerate(valid) if ok]
    priority = tie_break_priority(len(rows), seed).tolist()

    def dist(i: int, j: int) -> float:
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True))) / math.sqrt(
            channels
        )

    def ranks_above(j: int, i: int, value: dict[int, float]) -> bool:
        return value[j] > value[i] or (value[j] == value[i] and priority[j] > priority[i])

    density = {}
    for i in tokens:
        nearest = sorted(dist(i, j) for j in tokens)[: min(k, len(tokens))]
        density[i] = math.exp(-sum(d * d for d in nearest) / len(nearest))
    largest = max(dist(i, j) for i in tokens for j in tokens)
    delta = {}
    for i in tokens:
        denser = [dist(i, j) for j in tokens if ranks_above(j, i, density)]
        delta[i] = min(denser) if denser else largest
    score = {i: density[i] * delta[i] for i in tokens}

    def compare(i: int, j: int) -> int:
        return -1 if ranks_above(i, j, score) else 1

    centres = sorted(tokens, key=functools.cmp_to_key(compare))[: math.ceil(len(tokens) * ratio)]
    assignment = {}
    for i in tokens:
        if i in centres:
            assignment[i] = centres.index(i)
        else:
            assignment[i] = min(range(len(centres)), key=lambda c: (dist(i, centres[c]), c))
    return centres, assignment


def assert_matches_reference(
    x: torch.Tensor, mask: torch.Tensor | None, ratio: float = 0.5, k: int = 3
) -> None:
    clusters = dpc_knn(x, ratio, k, mask)
    for b in range(x.shape[0]):
        valid = [True] * x.shape[1] if mask is None else mask[b].tolist()
        centres, assignment = reference_dpc_knn(x[b], valid, ratio, k)
        count = len(centres)
        assert clusters.mask[b].tolist() == [c < count for c in range(clusters.mask.shape[1])]
        assert clusters.centres[b, :count].tolist() == centres
        expected = [assignment.get(i, -1) for i in range(x.shape[1])]
        assert clusters.assignment[b].tolist() == expected


def test_matches_reference_on_random_tokens():
    torch.manual_seed(0)
    assert_matches_reference(torch.randn(4, 24, 8), None)


def test_matches_reference_with_padding():
    torch.manual_seed(1)
    x = torch.randn(3, 20, 6)
    mask = torch.arange(20) < torch.tensor([[20], [13], [1]])
    x[~mask] = 1e3  # padding must not matter, however far away or close it is
    assert_matches_reference(x, mask)


def test_matches_reference_with_duplicated_tokens():
    torch.manual_seed(2)
    x = torch.randn(2, 16, 5)
    x[0, 1:6] = x[0, 0]  # a block of identical tokens: density and score ties
    x[0, 10] = x[0, 11]
    x[1] = x[1, 3]  # every token identical
    assert_matches_reference(x, None)
    clusters = dpc_knn(x, 0.5, 3)
    assert clusters.mask.all() and (clusters.assignment >= 0).all()


@pytest.mark.parametrize("n", [1, 2])
def test_matches_reference_with_fewer_tokens_than_neighbours(n):
    torch.manual_seed(3)
    assert_matches_reference(torch.randn(2, n, 4), None, k=3)
    clusters = dpc_knn(torch.randn(2, n, 4), 0.5, 3)
    assert clusters.mask.shape == (2, 1) and clusters.assignment.eq(0).all()


def test_counts_follow_the_ratio_per_item():
    torch.manual_seed(4)
    mask = torch.arange(10) < torch.tensor([[10], [7], [3]])
    clusters = dpc_knn(torch.randn(3, 10, 4), 0.3, 3, mask)
    assert clusters.mask.sum(dim=1).tolist() == [3, 3, 1]  # ceil(10 * 0.3) is 3, not 4
    assert keep_count(12, 0.5) == 6 and keep_count(1, 0.5) == 1


def test_every_cluster_is_used_and_owns_its_centre():
    torch.manual_seed(5)
    x = torch.randn(3, 32, 8)
    clusters = dpc_knn(x, 0.25, 3)
    for b in range(3):
        assert sorted(set(clusters.assignment[b].tolist())) == list(range(8))
        assert clusters.assignment[b, clusters.centres[b]].tolist() == list(range(8))


def test_deterministic_and_independent_of_the_rest_of_the_batch():
    torch.manual_seed(6)
    x = torch.randn(5, 40, 16)
    first, second = dpc_knn(x, 0.5, 3), dpc_knn(x, 0.5, 3)
    assert torch.equal(first.assignment, second.assignment)
    alone = dpc_knn(x[2:3], 0.5, 3)
    assert torch.equal(alone.assignment[0], first.assignment[2])


def test_rejects_items_without_tokens():
    with pytest.raises(ValueError, match="at least one token"):
        dpc_knn(torch.randn(2, 4, 3), 0.5, 3, torch.tensor([[True] * 4, [False] * 4]))


def test_merge_is_the_score_weighted_mean_of_each_cluster():
    torch.manual_seed(7)
    x = torch.randn(2, 12, 4, requires_grad=True)
    scores = torch.randn(2, 12, requires_grad=True) * 30  # large scores must not overflow exp()
    scores.retain_grad()
    mask = torch.arange(12) < torch.tensor([[12], [9]])
    clusters = dpc_knn(x, 0.5, 3, mask)
    merged = merge_clusters(x, clusters, scores)
    for b in range(2):
        for c in range(clusters.mask.shape[1]):
            members = (clusters.assignment[b] == c).nonzero().flatten()
            if len(members) == 0:
                assert not clusters.mask[b, c] and merged[b, c].abs().max() == 0
                continue
            weights = torch.softmax(scores[b, members].double(), dim=0)
            expected = (weights[:, None] * x[b, members].double()).sum(dim=0)
            torch.testing.assert_close(merged[b, c].double(), expected, rtol=1e-5, atol=1e-6)
    merged.square().sum().backward()
    assert x.grad.abs().sum() > 0 and scores.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all() and torch.isfinite(scores.grad).all()
    assert x.grad[1, 9:].abs().max() == 0  # padding takes no part
