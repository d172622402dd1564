"""Average query expansion (Chum et al. 2007): search again with the query averaged with its top results.

Works over anything :class:`Searchable`: a :class:`~selret.search.vectors.VectorIndex`, or the
shards of a :class:`~selret.search.sharded.ShardedSearch` seen as one set of vectors.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from selret.numerics import l2_normalize
from selret.search.vectors import as_matrix, check_k

__all__ = ["Searchable", "average_query_expansion", "search"]


class Searchable(Protocol):
    """What query expansion needs of an index: its dimension, top-k search and stored vectors."""

    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def reconstruct(self, ids: np.ndarray) -> np.ndarray: ...


def average_query_expansion(
    queries: np.ndarray, index: Searchable, k: int, n_results: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Average query expansion: search again with l2(query + sum of its top-``k`` vectors).

    ``index`` is a :class:`~selret.search.vectors.VectorIndex` (or anything with its ``search``
    and ``reconstruct``). Returns the second search's (scores, ids), ``n_results`` (default
    ``k``) per query. Queries are expected unit-norm like the indexed vectors, so the sum is the
    paper's average up to scale.
    """
    q = as_matrix(queries, index.dim, "queries", allow_vector=True)
    k = check_k(k)
    _, top = index.search(q, k)
    valid = top >= 0
    expanded = q.copy()
    if valid.any():
        uniq, inverse = np.unique(top[valid], return_inverse=True)
        neighbours = np.zeros((*top.shape, index.dim), np.float32)
        neighbours[valid] = index.reconstruct(uniq)[inverse]
        expanded += neighbours.sum(axis=1)
    return index.search(l2_normalize(expanded), check_k(n_results or k))


def search(
    index: Searchable, queries: np.ndarray, k: int, query_expansion: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) of ``index`` for ``queries`` (a 1-D vector is one query).

    ``query_expansion`` > 0 re-queries with the average of each query and its top
    ``query_expansion`` results (:func:`average_query_expansion`); 0 is a plain search.
    """
    q = as_matrix(queries, index.dim, "queries", allow_vector=True)
    k = check_k(k)
    if query_expansion:
        return average_query_expansion(q, index, query_expansion, n_results=k)
    return index.search(q, k)
