"""Full-ranking metrics against hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from canet_kernels.metrics import (MetricAccumulator, full_ranking, mask_scores,
                                   target_rank)


def test_single_target_by_hand():
    # items 1..5 (column 0 is padding and scores highest on purpose)
    scores = torch.tensor([[9.0, 0.5, 0.9, 0.1, 0.7, 0.3],
                           [9.0, 0.5, 0.9, 0.1, 0.7, 0.3]])
    targets = torch.tensor([4, 3])      # ranks: item 4 is 2nd (rank 1); item 3 is last (4)
    m = full_ranking(scores, targets, ks=(1, 2, 5))
    assert m["hr@1"].tolist() == [0.0, 0.0]
    assert m["hr@2"].tolist() == [1.0, 0.0]
    assert m["recall@5"].tolist() == [1.0, 1.0]
    assert m["ndcg@2"][0].item() == pytest.approx(1 / math.log2(3))
    assert m["ndcg@2"][1].item() == 0.0
    assert m["ndcg@5"][1].item() == pytest.approx(1 / math.log2(6))


def test_ties_count_against_the_target():
    scores = torch.zeros(1, 11)               # items 1..10 all tie
    m = full_ranking(scores, torch.tensor([5]), ks=(5, 10))
    assert m["hr@5"].item() == 0.0            # the 9 others count as ahead: rank 9
    assert m["ndcg@10"].item() == pytest.approx(1 / math.log2(11))
    assert target_rank(mask_scores(scores), torch.tensor([5])).item() == 9
    scores[0, 5] = 1.0
    assert full_ranking(scores, torch.tensor([5]), ks=(1,))["ndcg@1"].item() == 1.0


def test_seen_items_masking():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0]])
    t = torch.tensor([3])
    assert full_ranking(scores, t, ks=(1,))["hr@1"].item() == 0.0
    seen = torch.tensor([[1, 2, 0]])          # 0-padded history
    m = full_ranking(scores, t, ks=(1,), seen=seen)
    assert m["hr@1"].item() == 1.0 and m["ndcg@1"].item() == 1.0
    # masking does not change the caller's tensor
    assert scores[0, 1] == 5.0


def test_multi_target_by_hand():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    targets = torch.tensor([[2, 5, 0]])       # relevant: items 2 (pos 1) and 5 (pos 4)
    m = full_ranking(scores, targets, ks=(2, 5))
    assert m["recall@2"].item() == pytest.approx(0.5)
    assert m["hr@2"].item() == 1.0
    assert m["recall@5"].item() == pytest.approx(1.0)
    dcg2 = 1 / math.log2(3)
    idcg2 = 1 + 1 / math.log2(3)
    assert m["ndcg@2"].item() == pytest.approx(dcg2 / idcg2)
    dcg5 = 1 / math.log2(3) + 1 / math.log2(6)
    assert m["ndcg@5"].item() == pytest.approx(dcg5 / idcg2)


def test_multi_target_single_matches_1d():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(32, 50, generator=g)
    t = torch.randint(1, 50, (32,), generator=g)
    a = full_ranking(scores, t)
    b = full_ranking(scores, t[:, None])
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_padding_is_never_ranked():
    scores = torch.tensor([[100.0, 1.0, 2.0]])
    assert full_ranking(scores, torch.tensor([2]), ks=(1,))["hr@1"].item() == 1.0


def test_accumulator_means():
    acc = MetricAccumulator()
    acc.update({"hr@10": torch.tensor([1.0, 0.0])})
    acc.update({"hr@10": torch.tensor([1.0])})
    assert acc.result()["hr@10"] == pytest.approx(2 / 3)
    assert acc.count == 3


def test_multi_target_ties_count_against_the_target():
    # the same pessimistic rule as the 1-D path: every other item scoring >=
    # a target ranks ahead of it, whatever order topk leaves tied items in
    scores = torch.zeros(1, 11)               # items 1..10 all tie
    one = full_ranking(scores, torch.tensor([5]), ks=(5, 10))
    many = full_ranking(scores, torch.tensor([[5]]), ks=(5, 10))
    assert many["hr@5"].item() == one["hr@5"].item() == 0.0    # rank 9
    assert many["ndcg@10"].item() == pytest.approx(1 / math.log2(11))
    # two relevant items tied with everything: each has 9 items ahead
    m = full_ranking(scores, torch.tensor([[2, 5, 0]]), ks=(5, 10))
    assert m["hr@5"].item() == 0.0 and m["recall@10"].item() == 1.0
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@10"].item() == pytest.approx(2 / math.log2(11) / idcg)
    # tie-heavy scores: one target as [B, 1] gives exactly the 1-D values
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (64, 30), generator=g).float()
    t = torch.randint(1, 30, (64,), generator=g)
    a = full_ranking(scores, t, ks=(1, 5, 10))
    b = full_ranking(scores, t[:, None], ks=(1, 5, 10))
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)
