"""Evaluation harness: metrics against hand-computed values, tie handling, seen-item filtering, baselines."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from streamrec.models.data import Step
from streamrec.models.evaluate import evaluate, evaluate_scorer, metrics_from_ranks, ranks


def test_ranks_and_metrics_match_hand_computed_values() -> None:
    # Column 0 is padding (ignored). Row 0: target 2 scores highest -> rank 0. Row 1: target 1 is beaten by
    # items 2 and 3 -> rank 2. Row 2: target 3 is beaten by items 1 and 2 -> rank 2.
    scores = torch.tensor([[9.0, 1.0, 5.0, 2.0], [9.0, 1.0, 3.0, 2.0], [9.0, 5.0, 4.0, 1.0]])
    targets = torch.tensor([2, 1, 3])
    r = ranks(scores, targets)
    assert r.tolist() == [0, 2, 2]
    m = metrics_from_ranks(r, ks=(1, 3))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 + 2 / math.log2(4)) / 3)


def test_ties_never_flatter_the_target() -> None:
    scores = torch.zeros(1, 6)
    assert ranks(scores, torch.tensor([4])).tolist() == [3]  # items 1, 2, 3 tie and come first


def test_filter_seen_drops_history_items_and_counts_a_seen_target_as_a_miss() -> None:
    scores = torch.tensor([[0.0, 9.0, 8.0, 7.0, 6.0]])
    assert ranks(scores, torch.tensor([3])).tolist() == [2]
    assert ranks(scores, torch.tensor([3]), exclude=[[1, 2]]).tolist() == [0]
    assert ranks(scores, torch.tensor([3]), exclude=[[3]]).tolist() == [5]


def test_evaluate_scorer_reports_coverage_and_users() -> None:
    cases = {"a": ([Step(1, 1)], 2), "b": ([Step(1, 2)], 3)}

    def scorer(seqs):  # type: ignore[no-untyped-def]
        return torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5]]).expand(len(seqs), -1)

    m = evaluate_scorer(scorer, cases, num_items=4)
    assert m["users"] == 2
    assert m["hr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(2)) / 2)
    assert m["coverage@10"] == 1.0


def test_baselines_on_a_file_in_sasrec_format(tmp_path: Path) -> None:
    # Everyone watches 1 -> 2 -> 3 -> 4; item-kNN learns the co-occurrence, popularity ranks by count.
    lines = [f"{u} {i}" for u in range(1, 31) for i in (1, 2, 3, 4)]
    lines += [f"{u} {i}" for u in range(31, 41) for i in (5, 6, 5, 7)]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    result = evaluate(tmp_path / "d.txt")
    assert result["users"] == 40 and result["items"] == 7
    assert result["itemknn"]["hr@10"] == 1.0  # type: ignore[index]
    assert 0 < result["popular"]["ndcg@10"] <= 1  # type: ignore[index]
    assert "model" not in result
