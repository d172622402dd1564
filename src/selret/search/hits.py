"""Search results as catalog hits: :class:`SearchHit`, and how search keys map to shards.

A search over one :class:`~selret.search.store.ImageIndex` returns catalog ids; a search over the
shards of a :class:`~selret.search.sharded.ShardedSearch` returns keys ``shard << 48 | id``. With
``shard`` 0 both read the same, so :func:`search_hits` turns either into hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from selret.search.expansion import Searchable, search

__all__ = ["ID_MASK", "SHARD_SHIFT", "SearchHit", "search_hits"]

SHARD_SHIFT = 48
"""A hit's key is ``shard << SHARD_SHIFT | id``: catalog ids stay below 2**48 (2.8e14)."""

ID_MASK = (1 << SHARD_SHIFT) - 1


@dataclass(frozen=True)
class SearchHit:
    """One search result: catalog ``id``, image ``path``, inner-product ``score``, metadata.

    ``shard`` is the position of the shard in a :class:`~selret.search.sharded.ShardedSearch`
    (0 for a single index); ``(shard, id)`` identifies a hit across shards.
    """

    id: int
    path: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    shard: int = 0


class _Catalog(Protocol):
    def _hits(self, scores: np.ndarray, ids: np.ndarray, shard: int) -> list[SearchHit]: ...


def search_hits(
    searchable: Searchable,
    shards: Sequence[_Catalog],
    queries: np.ndarray,
    k: int,
    query_expansion: int,
) -> list[list[SearchHit]]:
    """Search (with optional average QE) and turn keys into catalog hits of their shards.

    ``shards[n]`` makes the hits of the keys of shard ``n``; rows keep the search's order.
    """
    scores, keys = search(searchable, queries, k, query_expansion)
    shard_of, ids = keys >> SHARD_SHIFT, keys & ID_MASK
    grid: list[list[SearchHit | None]] = [[None] * keys.shape[1] for _ in range(len(keys))]
    for n, shard in enumerate(shards):
        mine = (keys >= 0) & (shard_of == n)
        rows, cols = np.nonzero(mine)  # row-major, like the boolean indexing below
        for row, col, hit in zip(rows, cols, shard._hits(scores[mine], ids[mine], n), strict=True):
            grid[row][col] = hit
    return [[hit for hit in row if hit is not None] for row in grid]
