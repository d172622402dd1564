"""Scoring a ranking against a benchmark's ground truth, under the benchmark's declared protocol.

Every benchmark gets mAP, mP@k, per-query AP and top-1 accuracy under its protocol
(:meth:`~selret.evaluation.datasets.RetrievalBenchmark.gnd`), per-group figures when its queries
have a few categories, Easy / Medium / Hard mAP when the protocol is a revisited one, and the
scores it declares in ``metrics`` (the UKBench N-S score). Nothing depends on a benchmark's name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from selret.evaluation.datasets import NS_SCORE, RetrievalBenchmark, protocol_name
from selret.evaluation.metrics import (
    REVISITED_PROTOCOLS,
    compute_map,
    compute_map_revisited,
    mean_by_group,
    relevant_in_top,
    topk_accuracy,
)

KAPPAS = (1, 5, 10)
# Per-group tables (phone, landmark) are kept readable: more groups than this are left out.
MAX_GROUPS = 20


def _per_group(queries, aps: np.ndarray, hits: np.ndarray) -> dict[str, dict[str, float]]:
    cats = [q.category for q in queries]
    if not (all(c is not None for c in cats) and 1 < len(set(cats)) <= MAX_GROUPS):
        return {}
    maps_g, top1_g = mean_by_group(aps, cats), mean_by_group(hits, cats)
    return {c: {"n": cats.count(c), "map": maps_g[c], "top1": top1_g[c]} for c in maps_g}


def ns_score(
    benchmark: RetrievalBenchmark, ranks: np.ndarray, protocol: str | None = None
) -> float:
    """The N-S score: the mean number of each query's group (its positives under ``protocol``
    and its own database image) in its top 4."""
    gnd = benchmark.gnd(protocol)
    groups = [
        list(g["ok"]) + ([q.image_index] if q.image_index is not None else [])
        for g, q in zip(gnd, benchmark.queries, strict=True)
    ]
    return relevant_in_top(ranks, groups, 4)


def score(
    benchmark: RetrievalBenchmark,
    ranks: np.ndarray,
    kappas: Sequence[int] = KAPPAS,
    protocol: str | None = None,
) -> dict:
    """Every metric of ``benchmark`` for (n_db, n_q) ``ranks`` under ``protocol`` (default: the
    benchmark's): ``map``, ``aps`` (per query), ``mp_at_k``, ``top1`` and ``top1_per_query``,
    ``per_group`` (when the queries have at most ``MAX_GROUPS`` categories), ``ns_score`` (when the
    benchmark declares it, else None) and ``revisited`` Easy / Medium / Hard mAP (when the
    protocol is a revisited one, else None)."""
    protocol = protocol_name(protocol or benchmark.protocol)
    queries = benchmark.queries
    gnd = benchmark.gnd(protocol)
    result = compute_map(ranks, gnd, kappas)
    positives = [g["ok"] for g in gnd]
    junk = [g["junk"] for g in gnd]
    hits = np.array(
        [topk_accuracy(ranks[:, [i]], [positives[i]], 1, [junk[i]]) for i in range(len(queries))]
    )
    rev = None
    if protocol in REVISITED_PROTOCOLS:
        by_protocol = compute_map_revisited(ranks, benchmark.gnd(revisited=True), kappas=kappas)
        rev = {k: v.map for k, v in by_protocol.items()}
    return {
        "map": result.map,
        "aps": result.aps,
        "mp_at_k": {k: float(v) for k, v in zip(kappas, result.mpr, strict=True)},
        "top1": topk_accuracy(ranks, positives, 1, junk),
        "top1_per_query": hits,
        "per_group": _per_group(queries, result.aps, hits),
        "ns_score": ns_score(benchmark, ranks, protocol) if NS_SCORE in benchmark.metrics else None,
        "revisited": rev,
    }


__all__ = ["KAPPAS", "MAX_GROUPS", "ns_score", "score"]
