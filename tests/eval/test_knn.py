"""Weighted kNN (DINO): equal to a brute-force reference, chunking-invariant, bounded by chunks."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_vit.eval.knn import knn_accuracy, knn_predict, topk_neighbours


def _brute_force_votes(train, train_y, queries, num_classes, k, temperature):
    """Plain-Python DINO vote: every similarity, sort, exp(sim / T)-weighted label counts: (Q, C)."""
    train = [[v / math.sqrt(sum(u * u for u in t)) for v in t] for t in train.tolist()]
    preds = []
    for q in queries.tolist():
        norm = math.sqrt(sum(v * v for v in q))
        q = [v / norm for v in q]
        sims = [sum(a * b for a, b in zip(q, t)) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        preds.append(votes)
    return torch.tensor(preds, dtype=torch.float64)


def _toy(n_train=60, n_query=23, dim=8, num_classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    train_y = torch.randint(0, num_classes, (n_train,), generator=g)
    query_y = torch.randint(0, num_classes, (n_query,), generator=g)
    train = centers[train_y] + 0.8 * torch.randn(n_train, dim, generator=g)
    queries = centers[query_y] + 0.8 * torch.randn(n_query, dim, generator=g)
    return train, train_y, queries, query_y, num_classes


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_predict__equals_brute_force_reference(k):
    train, train_y, queries, _, c = _toy()
    # Unnormalised inputs on purpose: knn_predict must L2-normalise them itself.
    preds = knn_predict(train * 3.0, train_y, queries * 0.5, c, ks=[k], temperature=0.07)[k]
    votes = _brute_force_votes(train, train_y, queries, c, k, 0.07)  # (Q, C)
    assert torch.equal(preds[:, 0], votes.argmax(1))
    # Below the winner, classes with equal (e.g. zero) votes may come in any order: compare vote values.
    torch.testing.assert_close(votes.gather(1, preds), votes.topk(5, dim=1).values, rtol=1e-5, atol=1e-6)


def test_knn_predict__chunking_changes_nothing():
    train, train_y, queries, _, c = _toy(n_train=101, n_query=37)
    whole = knn_predict(train, train_y, queries, c, ks=[1, 10, 20, 200], query_chunk=1000, train_chunk=10**6)
    chunked = knn_predict(train, train_y, queries, c, ks=[1, 10, 20, 200], query_chunk=5, train_chunk=7)
    for k in whole:
        assert torch.equal(whole[k], chunked[k])


def test_topk_neighbours__running_merge_over_train_chunks_matches_full_topk():
    g = torch.Generator().manual_seed(1)
    train = torch.nn.functional.normalize(torch.randn(50, 4, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    sims, idx = topk_neighbours(train, queries, k=9, train_chunk=4)
    ref_s, ref_i = (queries @ train.T).topk(9, dim=1)
    torch.testing.assert_close(sims, ref_s)
    assert torch.equal(idx, ref_i)


def test_knn_accuracy__k_larger_than_train_set_uses_every_neighbour():
    train, train_y, queries, query_y, c = _toy(n_train=12, n_query=5)
    acc = knn_accuracy(train, train_y, queries, query_y, c, ks=[12, 200])
    assert acc[12] == acc[200]


def test_knn_accuracy__separated_clusters_are_classified_perfectly_and_top5_at_least_top1():
    train, train_y, queries, query_y, c = _toy(dim=32)
    train_far, queries_far = train * 0 + torch.eye(32)[train_y] * 5, torch.eye(32)[query_y] * 5
    acc = knn_accuracy(train_far, train_y, queries_far, query_y, c, ks=[10, 20])
    assert acc[20]["top1"] == 100.0
    noisy = knn_accuracy(train, train_y, queries, query_y, c, ks=[10, 20])
    assert all(r["top5"] >= r["top1"] for r in noisy.values())


def test_knn_predict__rejects_empty_train_set():
    with pytest.raises(ValueError, match="train split is empty"):
        knn_predict(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.randn(3, 4), 2)
