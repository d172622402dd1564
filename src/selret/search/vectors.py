"""In-memory vector search: :class:`VectorIndex`, faiss inner-product search with stable int64 ids.

Kinds: exact (``IndexFlatIP``), HNSW (``IndexHNSWFlat``), IVF-PQ (``IndexIVFPQ``), or ``"auto"``,
which picks one of them by size (:func:`choose_kind`). Scores are inner products; with unit-norm
vectors (what ``selret.encoding.encoder`` produces) they are cosine similarities, higher is better.
Result rows are padded with id ``-1`` and score ``-inf`` when fewer than ``k`` vectors are indexed.
SPEC section 8.

A query's results do not depend on the batch it is searched in: exact search runs
:func:`~selret.search.kernels.exact_top_k`, HNSW and IVF-PQ score each query on its own, and no
faiss setting is changed at import (see :mod:`selret.search.kernels`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import faiss
import numpy as np

from selret.files import atomic_write
from selret.search.kernels import blas_brute_force, exact_top_k, flat_vectors

__all__ = [
    "AUTO_EXACT_MAX",
    "AUTO_HNSW_MAX",
    "HNSW_COMPACT_FRACTION",
    "KINDS",
    "VectorIndex",
    "choose_kind",
    "recall_at_k",
]

KINDS = ("exact", "hnsw", "ivfpq")
"""The concrete index kinds; ``"auto"`` resolves to one of them."""

AUTO_EXACT_MAX = 100_000
"""``kind="auto"``: exact search below this many vectors (brute force is still a few ms/query)."""

AUTO_HNSW_MAX = 2_000_000
"""``kind="auto"``: HNSW below this many vectors, IVF-PQ from here (HNSW keeps raw vectors
plus its graph in RAM, about 4.3 KB per 512-D vector; IVF-PQ keeps ~70 bytes)."""

HNSW_COMPACT_FRACTION = 0.25
"""HNSW removal leaves tombstones; the graph is rebuilt once they exceed this share of it."""

_INT64_MAX = np.iinfo(np.int64).max
_TRAIN_POINTS_PER_CENTROID = 64


def choose_kind(n: int) -> str:
    """The index kind ``kind="auto"`` uses for ``n`` vectors.

    ``"exact"`` below :data:`AUTO_EXACT_MAX` (100k), ``"hnsw"`` below :data:`AUTO_HNSW_MAX` (2M),
    ``"ivfpq"`` above.
    """
    if n < AUTO_EXACT_MAX:
        return "exact"
    if n < AUTO_HNSW_MAX:
        return "hnsw"
    return "ivfpq"


def _default_nlist(n_train: int) -> int:
    # sqrt(n) inverted lists (the low end of faiss's advice, which keeps k-means training and
    # list assignment affordable on a few cores), at least 39 training points per list.
    return max(1, min(int(np.sqrt(n_train)), n_train // 39))


def _default_pq_m(dim: int) -> int:
    # Sub-quantizers of ~8 dimensions: 1 byte per 8 floats (a 32x compression).
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def as_matrix(x: Any, dim: int, name: str, *, allow_vector: bool = False) -> np.ndarray:
    """``x`` as a C-contiguous (n, dim) float32 array of finite values, or a ValueError."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    if allow_vector and a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _as_ids(ids: Any) -> np.ndarray:
    a = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if (a < 0).any():
        raise ValueError("ids must be >= 0 (-1 marks padding in search results)")
    return a


def check_k(k: int) -> int:
    """``k`` as an int, or a ValueError unless it is a positive integer."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


# ===================================================================== VectorIndex


class VectorIndex:
    """In-memory inner-product search over float32 vectors with caller-chosen int64 ids.

    Parameters
    ----------
    dim : vector dimension D.
    kind : ``"exact"`` (brute force, ``IndexFlatIP``), ``"hnsw"`` (graph, ``IndexHNSWFlat``),
        ``"ivfpq"`` (inverted lists + product quantization, ``IndexIVFPQ``: needs training, stores
        ~``pq_m`` bytes per vector, scores are approximate), or ``"auto"``: the kind follows the
        size, see :func:`choose_kind`. An ``"auto"`` index that grows past a threshold on
        :meth:`add` is rebuilt in the next kind (a one-off cost); it never moves back down.
    hnsw_m, ef_construction, ef_search : HNSW graph degree, build beam and search beam.
    nlist : IVF-PQ inverted lists; default ``min(sqrt(n), n / 39)`` for ``n`` training vectors
        (k-means then runs on at most 64 vectors per list).
    pq_m : IVF-PQ sub-quantizers (bytes per vector, must divide ``dim``); default ~``dim / 8``.
    nprobe : IVF-PQ lists visited per query; default ``min(nlist, 32)``.
    seed : seed of the IVF-PQ k-means.

    Exact and HNSW keep the raw vectors, so :meth:`reconstruct` is exact; IVF-PQ reconstructs
    from its codes (approximate). IVF-PQ ranks by those codes, so within dense clusters its
    top-10 misses part of the exact top-10 (recall@10 0.2-0.8 on synthetic 512-D data, see
    ``benchmarks/search_speed.py``) while its top-100 nearly always holds them: raise ``pq_m``
    or re-rank a longer list when that matters.

    HNSW graphs cannot delete nodes: :meth:`remove` marks them as tombstones, which searches
    skip, and the graph is rebuilt when tombstones exceed :data:`HNSW_COMPACT_FRACTION` of it
    (or on :meth:`compact`). The IVF-PQ index is trained on the first batch given to
    :meth:`add` unless :meth:`train` was called before. Not thread-safe.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "exact",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 100,
        ef_search: int = 128,
        nlist: int | None = None,
        pq_m: int | None = None,
        nprobe: int | None = None,
        seed: int = 0,
    ):
        if kind not in (*KINDS, "auto"):
            raise ValueError(f"kind must be one of {(*KINDS, 'auto')}, got {kind!r}")
        if int(dim) < 1:
            raise ValueError(f"dim must be positive, got {dim!r}")
        if pq_m is not None and dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide dim={dim}")
        self.dim = int(dim)
        self.kind = kind
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.nlist = nlist
        self.pq_m = pq_m
        self.nprobe = nprobe
        self.seed = seed
        self._ids = np.zeros(0, np.int64)  # live ids, in insertion order
        self._n_dead = 0  # HNSW tombstones
        self._index_kind = choose_kind(0) if kind == "auto" else kind
        self._index = None if self._index_kind == "ivfpq" else self._new_index(self._index_kind)

    # ----------------------------------------------------------------- properties
    @property
    def index_kind(self) -> str:
        """The concrete kind in use now (differs from :attr:`kind` only for ``"auto"``)."""
        return self._index_kind

    @property
    def ntotal(self) -> int:
        """Number of indexed (not removed) vectors."""
        return len(self._ids)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        """False only for an IVF-PQ index that has not been trained yet."""
        return self._index is not None

    @property
    def ids(self) -> np.ndarray:
        """The ids of the indexed vectors, in insertion order (a copy)."""
        return self._ids.copy()

    @property
    def params(self) -> dict[str, Any]:
        """The constructor arguments besides ``dim`` and ``kind`` (JSON-serialisable)."""
        names = ("hnsw_m", "ef_construction", "ef_search", "nlist", "pq_m", "nprobe", "seed")
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        kind = self.kind if self.kind == self._index_kind else f"auto->{self._index_kind}"
        return f"VectorIndex(dim={self.dim}, kind={kind!r}, ntotal={self.ntotal})"

    # ----------------------------------------------------------------- building
    def _new_index(self, kind: str, train: np.ndarray | None = None):
        if kind == "exact":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if kind == "hnsw":
            graph = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = self.ef_construction
            graph.hnsw.efSearch = self.ef_search
            return faiss.IndexIDMap2(graph)
        # IVF-PQ takes arbitrary int64 ids itself (no IDMap: IDMap's remove assumes the inner
        # index renumbers like a flat one); a hashtable direct map gives reconstruct and remove.
        assert train is not None
        nlist = self.nlist or _default_nlist(len(train))
        pq_m = self.pq_m or _default_pq_m(self.dim)
        min_train = max(256, nlist)  # 2**8 centroids per sub-quantizer
        if len(train) < min_train:
            raise ValueError(
                f"IVF-PQ needs at least {min_train} training vectors, got {len(train)}: "
                "add a larger first batch, call train() on a sample, or use kind='exact'/'hnsw'"
            )
        index = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(self.dim), self.dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.spherical = True  # unit-norm data: centroids on the sphere suit inner product
        for clustering in (index.cp, index.pq.cp):
            clustering.seed = self.seed
            # k-means on a sample of 64 points per centroid (faiss: 256), 4x faster training
            clustering.max_points_per_centroid = _TRAIN_POINTS_PER_CENTROID
        with blas_brute_force():
            index.train(train)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = self.nprobe or min(nlist, 32)
        self.nlist, self.pq_m, self.nprobe = nlist, pq_m, index.nprobe
        return index

    def _add_to_faiss(self, x: np.ndarray, ids: np.ndarray) -> None:
        if self._index_kind == "ivfpq":  # assigns the vectors to lists by brute force
            with blas_brute_force():
                self._index.add_with_ids(x, ids)
        else:
            self._index.add_with_ids(x, ids)

    def train(self, vectors: np.ndarray) -> None:
        """Train an empty IVF-PQ index on ``vectors`` (a representative sample); a no-op else."""
        x = as_matrix(vectors, self.dim, "vectors")
        if self._index_kind != "ivfpq":
            return
        if self.ntotal:
            raise ValueError("cannot retrain an IVF-PQ index that holds vectors")
        self._index = self._new_index("ivfpq", x)

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, ids) of every indexed vector; decoded (approximate) for IVF-PQ."""
        if self._index is None or not self.ntotal:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        if self._index_kind == "ivfpq":
            return self._index.reconstruct_batch(self._ids), self._ids.copy()
        inner = self._index.index
        slots = faiss.vector_to_array(self._index.id_map)
        keep = slots >= 0  # tombstoned HNSW slots carry id -1
        return inner.reconstruct_n(0, inner.ntotal)[keep], slots[keep]

    def _rebuild(self, kind: str, extra: np.ndarray | None = None) -> None:
        """Rebuild the faiss index as ``kind`` from the live vectors (and ``extra`` for training)."""
        x, ids = self._live_vectors()
        train = x if extra is None else np.concatenate([x, extra])
        self._index = self._new_index(kind, train)
        self._index_kind = kind
        self._n_dead = 0
        if len(ids):
            self._add_to_faiss(x, ids)

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstones; a no-op for other kinds."""
        if self._n_dead:
            self._rebuild("hnsw")

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` (n, D) float32 under ``ids`` (n,) int64 >= 0, unique and not present."""
        x = as_matrix(vectors, self.dim, "vectors")
        new_ids = _as_ids(ids)
        if len(new_ids) != len(x):
            raise ValueError(f"{len(x)} vectors but {len(new_ids)} ids")
        if len(np.unique(new_ids)) != len(new_ids):
            raise ValueError("ids contain duplicates")
        taken = new_ids[np.isin(new_ids, self._ids)]
        if len(taken):
            raise ValueError(f"ids already indexed: {taken[:10].tolist()}")
        if not len(x):
            return
        if self.kind == "auto":
            target = choose_kind(self.ntotal + len(x))
            if KINDS.index(target) > KINDS.index(self._index_kind):
                self._rebuild(target, extra=x)
        if self._index is None:  # untrained IVF-PQ: learn it from this first batch
            self._index = self._new_index("ivfpq", x)
        self._add_to_faiss(x, new_ids)
        self._ids = np.concatenate([self._ids, new_ids])

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove the vectors with these ids; unknown ids are ignored. Returns how many went."""
        gone = np.unique(_as_ids(ids if isinstance(ids, np.ndarray) else list(ids)))
        gone = gone[np.isin(gone, self._ids)]
        if not len(gone):
            return 0
        if self._index_kind == "hnsw":
            slots = faiss.vector_to_array(self._index.id_map)
            dead = np.isin(slots, gone)
            slots[dead] = -1
            faiss.copy_array_to_vector(slots, self._index.id_map)
            self._index.construct_rev_map()
            self._n_dead += int(dead.sum())
        elif self._index_kind == "ivfpq":
            self._index.remove_ids(faiss.IDSelectorArray(gone))  # hashtable needs an array
        else:
            self._index.remove_ids(faiss.IDSelectorBatch(gone))
        self._ids = self._ids[~np.isin(self._ids, gone)]
        if self._n_dead > HNSW_COMPACT_FRACTION * (self._n_dead + self.ntotal):
            self.compact()
        return len(gone)

    # ----------------------------------------------------------------- queries
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product. Returns (scores (nq, k) float32, ids (nq, k) int64).

        A 1-D query is treated as one row. Rows are padded with id -1, score -inf. A query gets
        the scores it gets when searched alone, whatever the batch (see the module docstring).
        """
        q = as_matrix(queries, self.dim, "queries", allow_vector=True)
        k = check_k(k)
        if not self.ntotal:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if self._index_kind == "exact":
            scores, slots = exact_top_k(flat_vectors(self._index.index), q, k)
            ids = faiss.vector_to_array(self._index.id_map)[slots]
            ids[slots < 0] = -1
            return scores, ids
        # The attributes are the live settings: pass them per search rather than into the index.
        # HNSW and IVF-PQ score each query on its own (IVF-PQ: query . centroid + PQ table). The
        # lists IVF-PQ visits come from faiss's brute force, BLAS from 128000 queries by default:
        # only a near-tie at the nprobe-th list could then go the other way.
        if self._index_kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = self.ef_search
            if self._n_dead:  # skip tombstones (id -1), i.e. keep ids in [0, INT64_MAX)
                keep = faiss.IDSelectorRange(0, _INT64_MAX)
                params.sel = keep
        else:
            params = faiss.SearchParametersIVF()
            params.nprobe = self.nprobe
        scores, ids = self._index.search(q, k, params=params)
        scores[ids < 0] = -np.inf
        return scores, ids

    def reconstruct(self, ids: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vector of one id (D,), or of several ids (n, D); KeyError if absent.

        Exact for ``"exact"`` and ``"hnsw"``, decoded from the PQ codes for ``"ivfpq"``.
        """
        scalar = np.ndim(ids) == 0
        wanted = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        missing = wanted[~np.isin(wanted, self._ids)]
        if len(missing):
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        if not len(wanted):
            return np.zeros((0, self.dim), np.float32)
        x = self._index.reconstruct_batch(wanted)
        return x[0] if scalar else x

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to one faiss file (tombstones and the kind included), atomically.

        An IVF-PQ index that has not been trained has nothing to write: ValueError.
        """
        if self._index is None:
            raise ValueError("an untrained IVF-PQ index cannot be saved: add or train first")
        if self._index_kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = self.ef_search
        elif self._index_kind == "ivfpq":
            self._index.nprobe = self.nprobe
        atomic_write(
            path, lambda fh: faiss.write_index(self._index, faiss.PyCallbackIOWriter(fh.write))
        )

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str | None = None, **params: Any) -> VectorIndex:
        """Read a file written by :meth:`save`.

        The concrete kind and its parameters come from the file; ``kind="auto"`` (not stored in
        faiss files) restores the growth policy, ``params`` supplies the constructor arguments
        the file does not hold (e.g. the HNSW settings an ``"auto"`` index will need later).
        """
        index = faiss.read_index(os.fspath(path))
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path}: not an inner-product index")
        if isinstance(index, faiss.IndexIVFPQ):
            found = "ivfpq"
            ids = _ivf_ids(index)
            params.update(nlist=index.nlist, pq_m=index.pq.M, nprobe=index.nprobe)
        elif isinstance(index, faiss.IndexIDMap2):
            inner = faiss.downcast_index(index.index)
            slots = faiss.vector_to_array(index.id_map)
            ids = slots[slots >= 0]
            if isinstance(inner, faiss.IndexHNSWFlat):
                found = "hnsw"
                params.update(
                    hnsw_m=inner.hnsw.nb_neighbors(1),
                    ef_construction=inner.hnsw.efConstruction,
                    ef_search=inner.hnsw.efSearch,
                )
            elif isinstance(inner, faiss.IndexFlat):
                found = "exact"
            else:
                raise ValueError(f"{path}: unsupported inner index {type(inner).__name__}")
        else:
            raise ValueError(f"{path}: unsupported faiss index {type(index).__name__}")
        if kind not in (None, "auto", found):
            raise ValueError(f"{path}: holds a {found!r} index, not {kind!r}")
        loaded = cls(index.d, "auto" if kind == "auto" else found, **params)
        loaded._index, loaded._index_kind, loaded._ids = index, found, ids
        loaded._n_dead = index.ntotal - len(ids)
        return loaded


def _ivf_ids(index) -> np.ndarray:
    """All ids stored in the inverted lists of an IVF index."""
    lists = index.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(index.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k  ∩  exact top-k| / |exact top-k| (padding ignored).

    Both are (nq, >=k) id arrays as returned by :meth:`VectorIndex.search`. Queries whose exact
    list is empty do not count; with none left the recall is 1.0.
    """
    k = check_k(k)
    approx, exact = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"{approx.shape[0]} approximate rows but {exact.shape[0]} exact rows")
    recalls = []
    for a, e in zip(approx, exact, strict=True):
        truth = e[e >= 0]
        if len(truth):
            recalls.append(np.isin(truth, a[a >= 0]).sum() / len(truth))
    return float(np.mean(recalls)) if recalls else 1.0
