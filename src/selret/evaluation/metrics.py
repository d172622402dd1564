"""Retrieval metrics: Oxford-protocol average precision with junk removal, the revisited
Easy/Medium/Hard protocols with mP@k, top-k accuracy and the UKBench N-S score.

Conventions, as in cirtorch / revisitop:

* ``ranks`` is an (n_db, n_q) integer array: column ``q`` lists database indices, best first.
  A ranking may be truncated (fewer than n_db rows); positives missing from it count as not found.
* ``gnd`` is a list with one mapping per query: ``'ok'`` (positive database indices, 0-based) and
  optionally ``'junk'`` (indices removed from the ranking before scoring); revisited ground truth
  has ``'easy'``, ``'hard'`` and ``'junk'`` instead of ``'ok'``.
* Results are fractions in [0, 1] (multiply by 100 for the paper's percentages).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

REVISITED_PROTOCOLS = ("easy", "medium", "hard")


class MapResult(NamedTuple):
    """Result of :func:`compute_map`.

    ``map``: mean AP over the queries that have positives. ``aps``: (n_q,) AP per query, NaN for a
    query without positives. ``mpr``: (len(kappas),) mean precision at each kappa over the same
    queries. ``prs``: (n_q, len(kappas)) per-query precisions, NaN rows for queries without positives.
    """

    map: float
    aps: np.ndarray
    mpr: np.ndarray
    prs: np.ndarray


def compute_ap(ranks: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Average precision from the sorted 0-based ranks of the retrieved positives.

    ``ranks`` are the positions of the positives in the ranking after junk removal, ascending;
    ``n_positives`` is the number of positives in the ground truth (positives never retrieved
    count as recall not reached). The official Oxford ``compute_ap``: recall rises by
    ``1/n_positives`` at each positive and the precision-recall curve is integrated with the
    trapezoid rule between the precision just before (``j/r``, 1 at rank 0) and at the positive
    (``(j+1)/(r+1)``).
    """
    if n_positives <= 0:
        raise ValueError(f"n_positives must be positive, got {n_positives}")
    recall_step = 1.0 / n_positives
    ap = 0.0
    for j, rank in enumerate(np.asarray(ranks, dtype=np.int64).tolist()):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def scores_to_ranks(scores: np.ndarray) -> np.ndarray:
    """(n_db, n_q) similarity scores -> (n_db, n_q) int64 ranks, highest score first.

    The sort is stable, so equal scores keep database order (lower index first).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_db, n_q), got shape {scores.shape}")
    # Negating keeps the stable sort's tie order (argsort of -s is stable in index order).
    return np.argsort(-scores, axis=0, kind="stable").astype(np.int64)


def rank_by_inner_product(query_vecs: np.ndarray, db_vecs: np.ndarray) -> np.ndarray:
    """Rank the database for each query by inner product.

    ``query_vecs`` is (n_q, D), ``db_vecs`` is (n_db, D); returns (n_db, n_q) int64 ranks, best
    first, ties in database order.
    """
    query_vecs = np.atleast_2d(np.asarray(query_vecs))
    db_vecs = np.atleast_2d(np.asarray(db_vecs))
    if query_vecs.shape[1] != db_vecs.shape[1]:
        raise ValueError(
            f"dimension mismatch: queries are {query_vecs.shape[1]}-D, database {db_vecs.shape[1]}-D"
        )
    return scores_to_ranks(db_vecs @ query_vecs.T)


def _as_ranks(ranks: np.ndarray, n_queries: int) -> np.ndarray:
    """Validate ``ranks``; a floating-point array is taken as (n_db, n_q) scores and sorted."""
    ranks = np.asarray(ranks)
    if ranks.ndim == 1:
        ranks = ranks[:, None]
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be (n_db, n_q), got shape {ranks.shape}")
    if np.issubdtype(ranks.dtype, np.floating):
        ranks = scores_to_ranks(ranks)
    elif not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integer indices or float scores, got dtype {ranks.dtype}")
    if ranks.shape[1] != n_queries:
        raise ValueError(
            f"ranks has {ranks.shape[1]} query columns but gnd has {n_queries} queries"
        )
    return ranks


def _indices(g: Mapping, key: str) -> np.ndarray:
    value = g.get(key)
    if value is None:
        return np.empty(0, dtype=np.int64)
    return np.asarray(value, dtype=np.int64).reshape(-1)


def _positive_positions(column: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in ``column`` once the junk entries are removed."""
    pos = np.flatnonzero(np.isin(column, ok))
    junk_pos = np.flatnonzero(np.isin(column, junk))
    # Each positive moves up by the number of junk entries ranked before it.
    return pos - np.searchsorted(junk_pos, pos)


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
) -> MapResult:
    """Mean average precision and mean precision at ``kappas`` under the Oxford protocol.

    ``ranks`` is (n_db, n_q) int indices (best first) or, if floating point, (n_db, n_q) scores
    (higher is better). ``gnd[q]`` holds ``'ok'`` and optionally ``'junk'``. Junk images are removed
    from the ranking before scoring. A query with no positive is skipped, as in cirtorch: its AP and
    precisions are NaN and it is left out of the means.

    Precision at k follows revisitop: with ``last`` the 1-based position of the last retrieved
    positive, ``k' = min(k, last)`` and P@k = (#positives within ``k'``) / ``k'``. A query whose
    positives are all absent from a truncated ranking scores 0.
    """
    ranks = _as_ranks(ranks, len(gnd))
    kappas = [int(k) for k in kappas]
    n_q = len(gnd)
    aps = np.full(n_q, np.nan)
    prs = np.full((n_q, len(kappas)), np.nan)
    for q, g in enumerate(gnd):
        ok = _indices(g, "ok")
        if ok.size == 0:
            continue
        pos = _positive_positions(ranks[:, q], ok, _indices(g, "junk"))
        aps[q] = compute_ap(pos, ok.size)
        if pos.size == 0:
            prs[q] = 0.0
            continue
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), k)
            prs[q, j] = np.count_nonzero(pos1 <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return MapResult(float("nan"), aps, np.full(len(kappas), np.nan), prs)
    return MapResult(float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs)


def normalize_protocol(protocol: str) -> str:
    """'E'/'easy', 'M'/'medium', 'H'/'hard' (any case) -> 'easy' | 'medium' | 'hard'."""
    key = str(protocol).strip().lower()
    for name in REVISITED_PROTOCOLS:
        if key in (name, name[0]):
            return name
    raise ValueError(f"unknown revisited protocol {protocol!r}; use easy/medium/hard (E/M/H)")


def revisited_gnd(g: Mapping, protocol: str) -> dict[str, np.ndarray]:
    """Positives and junk of one revisited query (``easy``/``hard``/``junk``) under a protocol.

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
    Hard: ok = hard, junk = junk + easy (as in revisitop).
    """
    easy, hard, junk = _indices(g, "easy"), _indices(g, "hard"), _indices(g, "junk")
    protocol = normalize_protocol(protocol)
    if protocol == "easy":
        return {"ok": easy, "junk": np.concatenate([junk, hard])}
    if protocol == "medium":
        return {"ok": np.concatenate([easy, hard]), "junk": junk}
    return {"ok": hard, "junk": np.concatenate([junk, easy])}


def compute_map_revisited(
    ranks: np.ndarray,
    gnd: Sequence[Mapping],
    protocols: Sequence[str] = REVISITED_PROTOCOLS,
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, MapResult]:
    """:func:`compute_map` under each revisited protocol; keys are 'easy'/'medium'/'hard'."""
    out = {}
    for protocol in protocols:
        name = normalize_protocol(protocol)
        out[name] = compute_map(ranks, [revisited_gnd(g, name) for g in gnd], kappas)
    return out


def topk_accuracy(
    ranks: np.ndarray,
    positives: Sequence[Sequence[int]],
    k: int = 1,
    junk: Sequence[Sequence[int]] | None = None,
) -> float:
    """Fraction of queries with at least one positive among the top ``k`` (after junk removal).

    ``positives[q]`` (and ``junk[q]``) are database indices. Queries with no positive are left
    out, as in :func:`compute_map`; NaN if no query has one.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = _as_ranks(ranks, len(positives))
    hits = []
    for q, pos in enumerate(positives):
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        if pos.size == 0:
            continue
        jq = np.empty(0, np.int64) if junk is None else np.asarray(junk[q], np.int64).reshape(-1)
        column = ranks[:, q]
        column = column[~np.isin(column, jq)]
        hits.append(bool(np.isin(column[:k], pos).any()))
    return float(np.mean(hits)) if hits else float("nan")


def relevant_in_top(ranks: np.ndarray, relevant: Sequence[Sequence[int]], k: int = 4) -> float:
    """Mean number of ``relevant[q]`` database indices among the top ``k`` of query ``q``'s ranking
    (nothing removed). With ``k = 4`` and each query's object group, itself included, this is
    UKBench's N-S score (0..4)."""
    ranks = _as_ranks(ranks, len(relevant))
    hits = [np.isin(ranks[:k, q], np.asarray(r, np.int64)).sum() for q, r in enumerate(relevant)]
    return float(np.mean(hits)) if hits else float("nan")


def ukbench_ns_score(
    ranks: np.ndarray, groups: Sequence[int] | np.ndarray, query_groups: Sequence[int] | None = None
) -> float:
    """UKBench N-S score: mean number of same-group images in the top 4 (itself included), 0..4.

    ``groups[i]`` is the object id of database image ``i``; ``query_groups[q]`` that of query ``q``
    (default: the queries are the database images in order, as in UKBench).
    """
    groups = np.asarray(groups).reshape(-1)
    query_groups = groups if query_groups is None else np.asarray(query_groups).reshape(-1)
    return relevant_in_top(ranks, [np.flatnonzero(groups == g) for g in query_groups], 4)


def mean_by_group(values: Sequence[float] | np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Mean of ``values`` per label (NaN values ignored), e.g. per-phone mAP for SMVS."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(labels):
        raise ValueError(f"{len(values)} values but {len(labels)} labels")
    out = {}
    for label in sorted(set(labels)):
        sel = values[[lab == label for lab in labels]]
        sel = sel[~np.isnan(sel)]
        out[label] = float(sel.mean()) if sel.size else float("nan")
    return out
