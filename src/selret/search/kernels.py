"""Brute-force inner-product search whose results do not depend on the query batch.

faiss switches its brute-force kernels by batch size (a per-query SIMD loop below
``faiss.cvar.distance_compute_blas_threshold`` queries, BLAS from there), and the two round
differently, so a query's scores would depend on the batch it came in. :func:`exact_top_k` gives
each query the scores it gets alone, at BLAS speed for batches. Nothing here changes a faiss
setting at import; :func:`blas_brute_force` lowers that threshold only inside its ``with`` block
(IVF-PQ training and adding, where only speed is at stake) and restores it.
"""

from __future__ import annotations

import faiss
import numpy as np

from selret.numerics import blas_brute_force

__all__ = ["blas_brute_force", "exact_top_k", "flat_vectors", "rescore_top_k"]

_SCORE_BLOCK = 1 << 24  # score-matrix entries per BLAS product in exact_top_k (64 MB)


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``base`` (n, D) by inner product with each query (nq, D), best first.

    Returns (scores (nq, k) float32, rows (nq, k) int64), padded with score ``-inf``, row ``-1``;
    equal scores come in row order. A query's results do not depend on the other queries of the
    batch: candidates come from one BLAS product (fast for batches, but BLAS picks its kernel, and
    so its rounding, by the shape of the product), then each candidate's score is computed again
    with faiss's per-pair SIMD inner product, which sees only that query and that row.
    """
    base = np.ascontiguousarray(base, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n, nq = len(base), len(q)
    if not n or not nq:
        return rescore_top_k(base, q, np.zeros((nq, 0), np.int64), k)
    n_cand = min(n, 2 * k + 16)  # the margin absorbs BLAS rounding (~1e-7) at the cut
    if n_cand == n:
        cand = np.tile(np.arange(n, dtype=np.int64), (nq, 1))
    else:
        cand = np.empty((nq, n_cand), np.int64)
        step = max(1, _SCORE_BLOCK // n)
        for start in range(0, nq, step):
            block = q[start : start + step] @ base.T
            cand[start : start + step] = np.argpartition(block, n - n_cand, axis=1)[:, n - n_cand :]
    return rescore_top_k(base, q, cand, k)


def rescore_top_k(
    base: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's ``candidates`` (rows of ``base``) by exact inner product.

    ``candidates`` is (nq, m) int64, ``-1`` for none (a short list, e.g. of an IVF or Hamming
    search, may be padded). Each score is computed with faiss's per-pair SIMD inner product, which
    sees only that query and that row, so it does not depend on the batch. Returns (scores (nq, k)
    float32, rows (nq, k) int64), best first, equal scores in row order, padded with ``-inf`` /
    ``-1``. Duplicate candidates are the caller's to avoid.
    """
    base = np.ascontiguousarray(base, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    cand = np.ascontiguousarray(candidates, dtype=np.int64)
    (nq, m), dim = cand.shape, base.shape[1]
    scores = np.full((nq, k), -np.inf, np.float32)
    rows = np.full((nq, k), -1, np.int64)
    if not m or not nq:
        return scores, rows
    exact = np.empty((nq, m), np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(exact),
        faiss.swig_ptr(q),
        faiss.swig_ptr(base),
        faiss.swig_ptr(cand),
        dim,
        nq,
        m,
    )  # fmt: skip  (a row -1 scores -inf)
    top = np.lexsort((cand, -exact))[:, :k]
    scores[:, : top.shape[1]] = np.take_along_axis(exact, top, 1)
    rows[:, : top.shape[1]] = np.take_along_axis(cand, top, 1)
    rows[scores == -np.inf] = -1
    return scores, rows


def flat_vectors(flat) -> np.ndarray:
    """The (ntotal, d) vectors of a faiss ``IndexFlat``: a read-only view, valid until it changes."""
    flat = faiss.downcast_index(flat)
    x = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
    x.flags.writeable = False
    return x


# faiss (1.15 here) switches brute force from its per-query SIMD loop to BLAS only for batches of
# 128000 queries; measured on AVX2, BLAS is ~10x faster from about 20 queries on (64 queries x 50k
# x 512-D: 96 ms vs 986 ms). That matters for the k-means of IVF-PQ training and the list
# assignment of added vectors, so they run with faiss's former threshold, 20. The setting is
# process-wide: it is lowered while at least one such block runs, then restored.
