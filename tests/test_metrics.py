"""Metrics cross-checked against values computed independently, by hand, from the formulas."""

from __future__ import annotations

import math

import pytest

from tasks.metrics import score_run


def _dcg(gains: list[float]) -> float:
    # trec_eval's (and so BEIR's and MTEB's) nDCG uses the relevance grade as the gain
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_small_run_matches_hand_computed_values():
    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d9": 1}, "q3": {"d5": 1}}
    run = {
        "q1": {"d3": 0.9, "d1": 0.8, "d4": 0.7, "d2": 0.6},
        "q2": {"d7": 0.5, "d8": 0.4},  # misses its only relevant document
        # q3: nothing returned at all, still counted as 0
    }
    means, per_query = score_run(qrels, run, [1, 3, 10])
    # q1 ranking: d3 (0), d1 (2), d4 (0), d2 (1)
    ideal = _dcg([2, 1])
    assert per_query["q1"]["ndcg@10"] == pytest.approx(_dcg([0, 2, 0, 1]) / ideal)
    assert per_query["q1"]["ndcg@3"] == pytest.approx(_dcg([0, 2, 0]) / ideal)
    assert per_query["q1"]["recall@3"] == pytest.approx(0.5)
    assert per_query["q1"]["precision@1"] == 0.0
    assert per_query["q1"]["mrr@10"] == pytest.approx(0.5)
    assert per_query["q1"]["mrr@1"] == 0.0
    assert per_query["q1"]["map@10"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert per_query["q2"]["ndcg@10"] == 0.0 and per_query["q3"]["ndcg@10"] == 0.0
    assert means["ndcg@10"] == pytest.approx(per_query["q1"]["ndcg@10"] / 3)
    assert means["recall@10"] == pytest.approx(1 / 3)
