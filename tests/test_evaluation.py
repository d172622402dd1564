"""Retrieval metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selret.evaluation.metrics import (
    compute_ap,
    compute_map,
    compute_map_revisited,
    mean_by_group,
    normalize_protocol,
    rank_by_inner_product,
    revisited_gnd,
    scores_to_ranks,
    topk_accuracy,
    ukbench_ns_score,
)


def col(*ids: int) -> np.ndarray:
    """A one-query ranking (n_db, 1)."""
    return np.array(ids, dtype=np.int64)[:, None]


def test_compute_ap_perfect_and_trapezoid():
    assert compute_ap([0, 1, 2], 3) == 1.0
    # Positives at 1-based ranks 1 and 3 of 4 (0-based 0 and 2), 2 positives, recall step 1/2:
    #   j=0, r=0: p0 = 1,   p1 = 1/1 -> (1 + 1)   * 1/2 / 2 = 1/2
    #   j=1, r=2: p0 = 1/2, p1 = 2/3 -> (1/2+2/3) * 1/2 / 2 = 7/24
    assert compute_ap([0, 2], 2) == pytest.approx(1 / 2 + 7 / 24)  # 19/24 = 0.791666...
    # One of three positives found, at rank 0: only a third of the recall is reached.
    assert compute_ap([0], 3) == pytest.approx(1 / 3)
    # First positive at rank 1: p0 = 0/1, p1 = 1/2 -> (0 + 1/2) * 1 / 2.
    assert compute_ap([1], 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="n_positives"):
        compute_ap([], 0)


def test_junk_removal_shifts_ranks():
    # Database: 0, 1 positives; 2 junk; 3 negative. Ranking 0, 2, 3, 1.
    ranks = col(0, 2, 3, 1)
    with_junk = compute_map(ranks, [{"ok": [0, 1], "junk": [2]}])
    # Junk 2 removed -> positives at 0-based 0 and 2: the 19/24 case above.
    assert with_junk.map == pytest.approx(19 / 24)
    # Not removed -> positives at 0 and 3: 1/2 + (1/3 + 2/4) / 4 = 17/24.
    assert compute_map(ranks, [{"ok": [0, 1]}]).map == pytest.approx(17 / 24)


def test_precision_at_k_follows_revisitop():
    # Positives at 1-based 1 and 3. P@1 = 1/1; P@5: k' = min(last positive 3, 5) = 3 -> 2/3.
    res = compute_map(col(0, 2, 1, 3, 4), [{"ok": [0, 1]}], kappas=[1, 5, 10])
    np.testing.assert_allclose(res.prs[0], [1.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(res.mpr, [1.0, 2 / 3, 2 / 3])


def test_queries_without_positives_are_skipped():
    ranks = np.array([[0, 0, 1], [1, 1, 0]])
    gnd = [{"ok": [0]}, {"ok": []}, {"ok": [0]}]  # AP 1, skipped, AP 0.25
    res = compute_map(ranks, gnd)
    assert math.isnan(res.aps[1]) and np.isnan(res.prs[1]).all()
    assert res.map == pytest.approx((1 + 0.25) / 2)
    np.testing.assert_allclose(res.aps[[0, 2]], [1.0, 0.25])
    assert math.isnan(compute_map(ranks, [{"ok": []}] * 3).map)


def test_truncated_ranking_counts_missing_positives():
    res = compute_map(col(5, 0), [{"ok": [0, 7]}], kappas=[1])
    # Positive 0 at rank 1 (j=0): (0/1 + 1/2) * 1/2 / 2 = 1/8; positive 7 never retrieved.
    assert res.map == pytest.approx(1 / 8)
    assert compute_map(col(5, 6), [{"ok": [0]}], kappas=[1]).prs[0, 0] == 0.0


def test_scores_are_ranked_stably():
    scores = np.array([[0.5, 0.1], [0.9, 0.1], [0.5, 0.7]])  # (n_db=3, n_q=2)
    np.testing.assert_array_equal(scores_to_ranks(scores), [[1, 2], [0, 0], [2, 1]])
    gnd = [{"ok": [0]}, {"ok": [2]}]
    assert compute_map(scores, gnd).map == compute_map(scores_to_ranks(scores), gnd).map


def test_rank_by_inner_product_ties_in_database_order():
    db = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Query 0 scores [1, 0, 1, 0.6] -> 0, 2 (tie, database order), 3, 1.
    np.testing.assert_array_equal(rank_by_inner_product(q, db), [[0, 1], [2, 3], [3, 0], [1, 2]])
    with pytest.raises(ValueError, match="dimension mismatch"):
        rank_by_inner_product(q, np.ones((4, 3)))


def test_revisited_protocols_on_tiny_example():
    g = {"easy": [0], "hard": [3], "junk": [5]}
    assert {k: v.tolist() for k, v in revisited_gnd(g, "E").items()} == {"ok": [0], "junk": [5, 3]}
    ranks = col(3, 5, 1, 0, 2, 4)
    res = compute_map_revisited(ranks, [g])
    # Easy: ok 0; 5 and 3 junk -> ranking 1, 0, 2, 4: positive at 1 -> (0 + 1/2) / 2 = 1/4.
    assert res["easy"].map == pytest.approx(0.25)
    # Medium: ok 0, 3; junk 5 -> ranking 3, 1, 0, 2, 4: positives at 0 and 2 -> 19/24.
    assert res["medium"].map == pytest.approx(19 / 24)
    # Hard: ok 3; 5 and 0 junk -> 3 first -> 1.
    assert res["hard"].map == 1.0
    assert list(compute_map_revisited(ranks, [g], protocols=["h"])) == ["hard"]
    with pytest.raises(ValueError, match="unknown revisited protocol"):
        normalize_protocol("extreme")


def test_topk_accuracy():
    ranks = np.array([[0, 2, 1], [1, 0, 2], [2, 1, 0]])
    positives = [[0], [1], [0]]
    # Query 0: top-1 = 0 hit; query 1: 2 then 0 then 1 -> hit at 3; query 2: 1, 2, 0 -> hit at 3.
    assert topk_accuracy(ranks, positives, k=1) == pytest.approx(1 / 3)
    assert topk_accuracy(ranks, positives, k=2) == pytest.approx(1 / 3)
    assert topk_accuracy(ranks, positives, k=3) == 1.0
    # Removing junk 2 from query 1 and 1 from query 2 brings both positives to rank 2.
    assert topk_accuracy(ranks, positives, k=2, junk=[[], [2], [1]]) == 1.0
    assert topk_accuracy(ranks, [[0], [], [0]], k=1) == pytest.approx(1 / 2)  # empty query skipped


def test_ukbench_ns_score():
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # Query of group 0 gets 0, 1, 4, 2 in its top 4 -> 3; query of group 1 gets 4, 0, 1, 2 -> 1.
    ranks = np.array([[0, 4], [1, 0], [4, 1], [2, 2], [3, 5], [5, 6], [6, 7], [7, 3]])
    assert ukbench_ns_score(ranks, groups, query_groups=[0, 1]) == pytest.approx(2.0)
    # Every image as a query with a perfect ranking (its group first) -> 4.
    perfect = np.stack([np.argsort(groups != groups[i], kind="stable") for i in range(8)], axis=1)
    assert ukbench_ns_score(perfect, groups) == 4.0


def test_mean_by_group_and_shape_errors():
    means = mean_by_group([1.0, 0.0, np.nan, 0.5], ["Canon", "Palm", "Palm", "Canon"])
    assert means == {"Canon": 0.75, "Palm": 0.0}
    with pytest.raises(ValueError, match="3 query columns but gnd has 2"):
        compute_map(np.zeros((4, 3), dtype=int), [{"ok": [0]}] * 2)
    with pytest.raises(ValueError, match="dtype"):
        compute_map(np.array([["a"]]), [{"ok": [0]}])
