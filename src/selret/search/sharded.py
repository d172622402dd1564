"""Search over several :class:`~selret.search.store.ImageIndex` shards as one: :class:`ShardedSearch`.

Each shard is searched for its own top-``k``; the lists are merged by score. Hits name their
shard; inside the merge a vector is keyed ``shard << 48 | id`` (:mod:`selret.search.hits`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from selret.errors import ConfigMismatchError
from selret.search.hits import ID_MASK, SHARD_SHIFT, SearchHit, search_hits
from selret.search.store import ImageIndex
from selret.search.vectors import VectorIndex

__all__ = ["ShardedSearch"]


class _ShardedVectors:
    """The vectors of several shards seen as one searchable set keyed by ``shard << 48 | id``."""

    def __init__(self, shards: Sequence[VectorIndex]):
        self.shards = shards
        self.dim = shards[0].dim

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        results = [shard.search(queries, k) for shard in self.shards]
        scores = np.concatenate([s for s, _ in results], axis=1)
        keys = np.concatenate(
            [
                np.where(ids >= 0, (n << SHARD_SHIFT) | ids, -1)
                for n, (_, ids) in enumerate(results)
            ],
            axis=1,
        )
        # Best score first; equal scores by key, so the merge is deterministic.
        order = np.lexsort((keys, -scores), axis=1)[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)

    def reconstruct(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, np.int64)
        out = np.empty((len(keys), self.dim), np.float32)
        shard_of = keys >> SHARD_SHIFT
        for n in np.unique(shard_of):
            mine = shard_of == n
            out[mine] = self.shards[n].reconstruct(keys[mine] & ID_MASK)
        return out


class ShardedSearch:
    """Search several :class:`ImageIndex` shards as one: per-shard top-``k`` merged by score.

    The shards must hold vectors of the same encoder (same fingerprint and dimension) and
    should hold disjoint images. Exact shards give exactly the top-``k`` of one index holding
    all the vectors. Hits carry ``shard``, the position of their shard in ``shards``.
    """

    def __init__(self, shards: Sequence[ImageIndex]):
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("ShardedSearch needs at least one shard")
        first = self.shards[0]
        for shard in self.shards[1:]:
            if (shard.fingerprint, shard.dim) != (first.fingerprint, first.dim):
                raise ConfigMismatchError(
                    f"{shard.root}: encoder fingerprint {shard.fingerprint!r} (dim {shard.dim}) "
                    f"differs from {first.root}: {first.fingerprint!r} (dim {first.dim})"
                )
        if len(self.shards) >= 1 << (63 - SHARD_SHIFT):
            raise ValueError(f"at most {1 << (63 - SHARD_SHIFT)} shards")

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def search(
        self, vectors: np.ndarray, k: int, query_expansion: int = 0
    ) -> list[list[SearchHit]]:
        """Top-``k`` hits per query over all shards, best first (see :meth:`ImageIndex.search`)."""
        with contextlib.ExitStack() as stack:
            for shard in self.shards:  # shard order: a fixed lock order, so no deadlock
                stack.enter_context(shard._lock)
            searchable = _ShardedVectors([shard._vectors for shard in self.shards])
            return search_hits(searchable, self.shards, vectors, k, query_expansion)
