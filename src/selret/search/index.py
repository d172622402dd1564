"""Vector search over global image vectors: an in-memory faiss index and a persistent image index.

Three layers, each usable alone:

* :class:`VectorIndex` -- faiss inner-product search over float32 vectors with stable int64 ids:
  exact (``IndexFlatIP``), HNSW (``IndexHNSWFlat``), IVF-PQ (``IndexIVFPQ``), or ``"auto"``,
  which picks one of them by size (:func:`choose_kind`).
* :class:`ImageIndex` -- a directory on disk pairing a :class:`VectorIndex` with a SQLite catalog
  of the indexed images and a manifest naming the encoder that made the vectors. Saves are atomic.
* :class:`ShardedSearch` -- top-k search over several :class:`ImageIndex` shards, merged by score.

Scores are inner products; with unit-norm vectors (what ``selret.encoding.encoder`` produces) they are
cosine similarities, higher is better. Result rows are padded with id ``-1`` and score ``-inf``
when fewer than ``k`` vectors are indexed. SPEC section 8.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from selret.errors import ConfigMismatchError, CorruptIndexError, IndexConflictError
from selret.numerics import l2_normalize

try:  # advisory lock between writer processes; absent on Windows, where saves are unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "AUTO_EXACT_MAX",
    "AUTO_HNSW_MAX",
    "FORMAT_VERSION",
    "KINDS",
    "CorruptIndexError",
    "ImageIndex",
    "ImageRecord",
    "IndexConflictError",
    "SearchHit",
    "ShardedSearch",
    "VectorIndex",
    "average_query_expansion",
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

FORMAT_VERSION = 1
"""Version of the on-disk layout of :class:`ImageIndex`."""

_INT64_MAX = np.iinfo(np.int64).max
_TRAIN_POINTS_PER_CENTROID = 64

# faiss (1.15 here) switches brute-force search from its per-query SIMD loop to BLAS only for
# batches of 128000 queries; measured on AVX2, BLAS is ~10x faster from about 20 queries on
# (100 queries x 100k x 512-D: 2 ms/query vs 20 ms/query), for exact search and for the k-means
# of IVF training alike. So selret uses faiss's former threshold, 20 (process-wide; only lowered).
_BLAS_THRESHOLD = 20
faiss.cvar.distance_compute_blas_threshold = min(
    faiss.cvar.distance_compute_blas_threshold, _BLAS_THRESHOLD
)


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


def _as_matrix(x: Any, dim: int, name: str, *, allow_vector: bool = False) -> np.ndarray:
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


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


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
        index.train(train)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = self.nprobe or min(nlist, 32)
        self.nlist, self.pq_m, self.nprobe = nlist, pq_m, index.nprobe
        return index

    def train(self, vectors: np.ndarray) -> None:
        """Train an empty IVF-PQ index on ``vectors`` (a representative sample); a no-op else."""
        x = _as_matrix(vectors, self.dim, "vectors")
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
            self._index.add_with_ids(x, ids)

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstones; a no-op for other kinds."""
        if self._n_dead:
            self._rebuild("hnsw")

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` (n, D) float32 under ``ids`` (n,) int64 >= 0, unique and not present."""
        x = _as_matrix(vectors, self.dim, "vectors")
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
        self._index.add_with_ids(x, new_ids)
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

        A 1-D query is treated as one row. Rows are padded with id -1, score -inf.
        """
        q = _as_matrix(queries, self.dim, "queries", allow_vector=True)
        k = _check_k(k)
        if not self.ntotal:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        # The attributes are the live settings: pass them per search rather than into the index.
        params = None
        if self._index_kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = self.ef_search
            if self._n_dead:  # skip tombstones (id -1), i.e. keep ids in [0, INT64_MAX)
                keep = faiss.IDSelectorRange(0, _INT64_MAX)
                params.sel = keep
        elif self._index_kind == "ivfpq":
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
        """Write the index to one faiss file (tombstones and the kind included).

        An IVF-PQ index that has not been trained has nothing to write: ValueError.
        """
        if self._index is None:
            raise ValueError("an untrained IVF-PQ index cannot be saved: add or train first")
        if self._index_kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = self.ef_search
        elif self._index_kind == "ivfpq":
            self._index.nprobe = self.nprobe
        faiss.write_index(self._index, os.fspath(path))

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
    k = _check_k(k)
    approx, exact = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"{approx.shape[0]} approximate rows but {exact.shape[0]} exact rows")
    recalls = []
    for a, e in zip(approx, exact, strict=True):
        truth = e[e >= 0]
        if len(truth):
            recalls.append(np.isin(truth, a[a >= 0]).sum() / len(truth))
    return float(np.mean(recalls)) if recalls else 1.0


class _Searchable(Protocol):
    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def reconstruct(self, ids: np.ndarray) -> np.ndarray: ...


def average_query_expansion(
    queries: np.ndarray, index: _Searchable, k: int, n_results: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Average query expansion: search again with l2(query + sum of its top-``k`` vectors).

    ``index`` is a :class:`VectorIndex` (or anything with its ``search`` and ``reconstruct``).
    Returns the second search's (scores, ids), ``n_results`` (default ``k``) per query. Queries
    are expected unit-norm like the indexed vectors, so the sum is the paper's average up to scale.
    """
    q = _as_matrix(queries, index.dim, "queries", allow_vector=True)
    k = _check_k(k)
    _, top = index.search(q, k)
    valid = top >= 0
    expanded = q.copy()
    if valid.any():
        uniq, inverse = np.unique(top[valid], return_inverse=True)
        neighbours = np.zeros((*top.shape, index.dim), np.float32)
        neighbours[valid] = index.reconstruct(uniq)[inverse]
        expanded += neighbours.sum(axis=1)
    return index.search(l2_normalize(expanded), _check_k(n_results or k))


# ===================================================================== persistent image index


@dataclass(frozen=True)
class SearchHit:
    """One search result: catalog ``id``, image ``path``, inner-product ``score``, metadata.

    ``shard`` is the position of the shard in a :class:`ShardedSearch` (0 for a single index);
    ``(shard, id)`` identifies a hit across shards.
    """

    id: int
    path: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    shard: int = 0


@dataclass(frozen=True)
class ImageRecord:
    """One catalog row. ``added_at`` is an ISO-8601 UTC timestamp."""

    id: int
    path: str
    content_sha1: str | None
    width: int | None
    height: int | None
    added_at: str
    metadata: dict[str, Any]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of removed images are never reused
    path TEXT NOT NULL UNIQUE,
    content_sha1 TEXT,
    width INTEGER,
    height INTEGER,
    added_at TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}'
)
"""
_COLUMNS = "id, path, content_sha1, width, height, added_at, metadata"
_RESERVED_METADATA = ("content_sha1", "width", "height")
_SQL_CHUNK = 900  # bound parameters per statement, under SQLite's oldest limit (999)

_CURRENT = "CURRENT"
_LOCK = "LOCK"
_MANIFEST = "manifest.json"
_CATALOG = "catalog.sqlite"
_VECTORS = "vectors.faiss"


def _opt(kind: type, value: Any) -> Any:
    # SQLite binds Python scalars only (not numpy ones); None stays NULL.
    return None if value is None else kind(value)


def _chunks(items: Sequence, size: int = _SQL_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The writers of one save, module-level so that tests can make them fail mid-save.
def _write_vectors(vectors: VectorIndex, path: Path) -> None:
    vectors.save(path)
    _fsync_path(path)


def _write_catalog(db: sqlite3.Connection, path: Path) -> None:
    out = sqlite3.connect(path)
    try:
        db.backup(out)
    finally:
        out.close()
    _fsync_path(path)


def _write_manifest(manifest: dict, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _commit_pointer(root: Path, state: str) -> None:
    """Make ``state`` the live one: the single atomic step of a save."""
    tmp = root / (_CURRENT + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(state + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / _CURRENT)
    _fsync_path(root)


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    with open(root / _LOCK, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _state_number(state: str) -> int:
    return int(state.rsplit("-", 1)[1])


def _read_current(root: Path) -> str:
    try:
        return (root / _CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: not a selret index (no {_CURRENT} file)") from None


def _config_differences(stored: dict, expected: dict) -> str:
    keys = sorted(set(stored) | set(expected))
    diffs = [
        f"{key}: index {stored.get(key, '<unset>')!r} vs encoder {expected.get(key, '<unset>')!r}"
        for key in keys
        if stored.get(key) != expected.get(key)
    ]
    return "; ".join(diffs) or "none (same settings, different fingerprints)"


class ImageIndex:
    """A persistent image index: vectors, a catalog of the images, and the encoder that made them.

    On disk, a directory::

        CURRENT                 names the live state directory (replaced atomically)
        LOCK                    serialises writer processes
        state-000007/
            manifest.json       format_version, encoder_config, encoder_fingerprint, dim,
                                kind, index_kind, index_params, count
            catalog.sqlite      table images(id, path, content_sha1, width, height,
                                             added_at, metadata JSON)
            vectors.faiss       the VectorIndex, ids = catalog ids (absent while an IVF-PQ
                                index is empty and untrained)

    Changes live in memory until :meth:`save`, which writes a whole new state directory, then
    switches ``CURRENT`` to it with one ``os.replace`` and deletes the old one: a crash at any
    point leaves the previous state openable, its catalog and vectors in agreement. One writer
    at a time: a save refuses (:class:`IndexConflictError`) if another handle saved in between.

    Images are keyed by their path string exactly as given (pass normalised paths). Catalog ids
    are assigned from 1 up, never reused, and unchanged by removals. Create with :meth:`create`,
    reopen with :meth:`open`. A handle is safe to share between threads (calls are serialised).
    """

    def __init__(
        self, root: Path, state: str, manifest: dict, db: sqlite3.Connection, vectors: VectorIndex
    ):
        # Use ImageIndex.create / ImageIndex.open.
        self.root = root
        self._state = state
        self._manifest = manifest
        self._db = db
        self._vectors = vectors
        self._lock = threading.RLock()
        self._dirty = False

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        dim: int,
        encoder_config: dict,
        fingerprint: str,
        kind: str = "exact",
        **index_params: Any,
    ) -> ImageIndex:
        """Create an empty index at ``path`` (a new or empty directory) and save it.

        ``encoder_config`` (JSON-serialisable) and ``fingerprint`` describe the encoder whose
        vectors this index holds; :meth:`open` checks the fingerprint. ``kind`` and
        ``index_params`` are those of :class:`VectorIndex`.
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(f"{root}: exists and is not an empty directory")
        vectors = VectorIndex(dim, kind, **index_params)
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder_config": json.loads(json.dumps(encoder_config)),
            "encoder_fingerprint": str(fingerprint),
            "dim": int(dim),
            "kind": kind,
            "index_params": vectors.params,
        }
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.execute(_SCHEMA)
        db.commit()
        root.mkdir(parents=True, exist_ok=True)
        created = cls(root, "state-000000", manifest, db, vectors)
        created._save(first=True)
        return created

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_fingerprint: str | None = None,
        expected_config: dict | None = None,
    ) -> ImageIndex:
        """Open the index at ``path``, loading it into memory.

        With ``expected_fingerprint``, refuse (:class:`~selret.errors.ConfigMismatchError`) an
        index built by another encoder; ``expected_config`` only makes that message list the
        differing settings. Raises :class:`CorruptIndexError` when the state is unreadable or
        its catalog and vectors disagree.
        """
        root = Path(path)
        for _ in range(5):  # a writer may delete the state we picked while we read it: retry
            state = _read_current(root)
            try:
                manifest, db, vectors = cls._load_state(root / state)
                break
            except (FileNotFoundError, CorruptIndexError):
                if _read_current(root) == state:
                    raise
        else:  # pragma: no cover - five concurrent saves in a row
            raise IndexConflictError(f"{root}: the index kept changing while being opened")
        stored = manifest["encoder_fingerprint"]
        if expected_fingerprint is not None and expected_fingerprint != stored:
            detail = (
                f"differing settings: {_config_differences(manifest['encoder_config'], expected_config)}"
                if expected_config is not None
                else f"index encoder config: {json.dumps(manifest['encoder_config'], sort_keys=True)}"
            )
            raise ConfigMismatchError(
                f"{root}: index was built with encoder fingerprint {stored!r}, but the encoder "
                f"in use has fingerprint {expected_fingerprint!r}; {detail}. Rebuild the index "
                "with this encoder or use the encoder it was built with."
            )
        return cls(root, state, manifest, db, vectors)

    @staticmethod
    def _load_state(state_dir: Path) -> tuple[dict, sqlite3.Connection, VectorIndex]:
        try:
            manifest = json.loads((state_dir / _MANIFEST).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CorruptIndexError(f"{state_dir / _MANIFEST}: not valid JSON ({e})") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CorruptIndexError(
                f"{state_dir}: format_version {manifest.get('format_version')!r} is not "
                f"{FORMAT_VERSION}, the one this selret reads"
            )
        catalog = state_dir / _CATALOG
        if not catalog.is_file():
            raise FileNotFoundError(f"{catalog}: missing")
        src = sqlite3.connect(f"{catalog.resolve().as_uri()}?mode=ro", uri=True)
        db = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            src.backup(db)
        except sqlite3.DatabaseError as e:
            raise CorruptIndexError(f"{catalog}: {e}") from e
        finally:
            src.close()
        vectors_path = state_dir / _VECTORS
        params = manifest["index_params"]
        kind = manifest["kind"]
        if vectors_path.exists():
            vectors = VectorIndex.load(
                vectors_path, kind="auto" if kind == "auto" else None, **params
            )
        else:
            vectors = VectorIndex(manifest["dim"], kind, **params)
        catalog_ids = np.array([r[0] for r in db.execute("SELECT id FROM images")], np.int64)
        if vectors.dim != manifest["dim"] or not np.array_equal(
            np.sort(catalog_ids), np.sort(vectors.ids)
        ):
            raise CorruptIndexError(
                f"{state_dir}: catalog ({len(catalog_ids)} images) and vectors "
                f"({vectors.ntotal}, dim {vectors.dim}) disagree"
            )
        return manifest, db, vectors

    # ----------------------------------------------------------------- saving
    def save(self) -> None:
        """Commit the in-memory state to disk atomically (see the class docstring)."""
        with self._lock:
            self._save(first=False)

    def _save(self, first: bool) -> None:
        with _writer_lock(self.root):
            if not first:
                on_disk = _read_current(self.root)
                if on_disk != self._state:
                    raise IndexConflictError(
                        f"{self.root}: saved by another writer ({on_disk}) since this handle "
                        f"opened {self._state}; reopen it and redo the change"
                    )
            old = None if first else self._state
            # Leftovers of crashed saves are never live: clear them so the new name is free.
            for leftover in self.root.glob("state-*"):
                if leftover.name != old:
                    shutil.rmtree(leftover)
            new = f"state-{0 if first else _state_number(old) + 1:06d}"
            state_dir = self.root / new
            state_dir.mkdir()
            manifest = {
                **self._manifest,
                "index_kind": self._vectors.index_kind,
                "index_params": self._vectors.params,
                "count": len(self),
            }
            if self._vectors.is_trained:
                _write_vectors(self._vectors, state_dir / _VECTORS)
            _write_catalog(self._db, state_dir / _CATALOG)
            _write_manifest(manifest, state_dir / _MANIFEST)
            _fsync_path(state_dir)
            _commit_pointer(self.root, new)
            self._state, self._manifest, self._dirty = new, manifest, False
            if old is not None:
                shutil.rmtree(self.root / old, ignore_errors=True)

    # ----------------------------------------------------------------- catalog
    def __len__(self) -> int:
        return self._vectors.ntotal

    @property
    def dim(self) -> int:
        return self._manifest["dim"]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the encoder this index's vectors come from."""
        return self._manifest["encoder_fingerprint"]

    @property
    def encoder_config(self) -> dict:
        return self._manifest["encoder_config"]

    def _ids_of_paths(self, paths: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(paths):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT path, id FROM images WHERE path IN ({marks})", chunk)
            found.update(rows)
        return found

    def _rows(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        records: dict[int, ImageRecord] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {_COLUMNS} FROM images WHERE id IN ({marks})"
            for row in self._db.execute(sql, chunk):
                records[row[0]] = ImageRecord(*row[:6], metadata=json.loads(row[6]))
        return records

    def missing(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """The paths (as strings, first occurrences, in order) that are not indexed yet."""
        wanted = list(dict.fromkeys(os.fspath(p) for p in paths))
        with self._lock:
            present = self._ids_of_paths(wanted)
        return [p for p in wanted if p not in present]

    def get(self, key: int | str | os.PathLike) -> ImageRecord:
        """The catalog record of an id (int) or path (str); KeyError if absent."""
        with self._lock:
            if isinstance(key, int | np.integer):
                id_ = int(key)
            else:
                id_ = self._ids_of_paths([os.fspath(key)]).get(os.fspath(key), -1)
            record = self._rows([id_]).get(id_)
        if record is None:
            raise KeyError(key)
        return record

    def add(
        self,
        paths: Sequence[str | os.PathLike],
        vectors: np.ndarray,
        metadata: Sequence[dict | None] | None = None,
    ) -> list[int]:
        """Index images not indexed yet. Returns the new ids, in the order of the added paths.

        ``vectors`` is (len(paths), D); rows of paths already indexed (or repeated in
        ``paths``) are skipped, so re-adding a folder is cheap -- and :meth:`missing` tells
        which paths to encode at all. ``metadata`` dicts are stored as JSON; their keys
        ``content_sha1``, ``width`` and ``height`` fill the catalog columns of those names.
        """
        keys = [os.fspath(p) for p in paths]
        x = _as_matrix(vectors, self.dim, "vectors")
        if len(x) != len(keys):
            raise ValueError(f"{len(keys)} paths but {len(x)} vectors")
        metas = list(metadata) if metadata is not None else [None] * len(keys)
        if len(metas) != len(keys):
            raise ValueError(f"{len(keys)} paths but {len(metas)} metadata entries")
        added_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        with self._lock:
            new = set(self.missing(keys))
            rows, keep = [], []
            for i, (key, meta) in enumerate(zip(keys, metas, strict=True)):
                if key not in new:
                    continue
                new.discard(key)  # a path repeated in this batch is added once
                extra = dict(meta or {})
                sha1, width, height = (extra.pop(name, None) for name in _RESERVED_METADATA)
                rows.append(
                    (
                        key,
                        _opt(str, sha1),
                        _opt(int, width),
                        _opt(int, height),
                        added_at,
                        json.dumps(extra),
                    )
                )
                keep.append(i)
            if not rows:
                return []
            sql = (
                "INSERT INTO images (path, content_sha1, width, height, added_at, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            )
            with self._db:  # one transaction: rolled back if the vectors cannot be added
                ids = [self._db.execute(sql, row).lastrowid for row in rows]
                self._vectors.add(x[keep], np.asarray(ids, np.int64))
            self._dirty = True
            return ids

    def remove(self, items: Iterable[int | str | os.PathLike]) -> int:
        """Remove images given by id (int) or path (str); unknown ones are ignored.

        Returns the number removed. The ids of the remaining images do not change.
        """
        items = list(items)
        ids = {int(i) for i in items if isinstance(i, int | np.integer)}
        paths = [os.fspath(i) for i in items if not isinstance(i, int | np.integer)]
        with self._lock:
            ids.update(self._ids_of_paths(paths).values())
            ids = sorted(self._rows(sorted(ids)))  # keep those in the catalog
            if not ids:
                return 0
            with self._db:
                for chunk in _chunks(ids):
                    marks = ",".join("?" * len(chunk))
                    self._db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
                self._vectors.remove(np.asarray(ids, np.int64))
            self._dirty = True
            return len(ids)

    # ----------------------------------------------------------------- search
    def search(
        self, vectors: np.ndarray, k: int, query_expansion: int = 0
    ) -> list[list[SearchHit]]:
        """Top-``k`` images per query vector (a 1-D vector is one query), best first.

        ``query_expansion`` > 0 re-queries with the average of the query and its top
        ``query_expansion`` results (:func:`average_query_expansion`).
        """
        with self._lock:
            return _search_hits(self._vectors, [self], vectors, k, query_expansion)

    def _hits(self, scores: np.ndarray, ids: np.ndarray, shard: int) -> list[SearchHit]:
        records = self._rows(ids.tolist())
        return [
            SearchHit(int(i), records[i].path, float(s), records[i].metadata, shard)
            for s, i in zip(scores, ids, strict=True)
        ]

    def info(self) -> dict[str, Any]:
        """A summary for humans and the CLI (counts, kinds, encoder, size on disk)."""
        with self._lock:
            state_dir = self.root / self._state
            return {
                "path": str(self.root),
                "state": self._state,
                "format_version": self._manifest["format_version"],
                "count": len(self),
                "dim": self.dim,
                "kind": self._manifest["kind"],
                "index_kind": self._vectors.index_kind,
                "index_params": self._vectors.params,
                "encoder_fingerprint": self.fingerprint,
                "encoder_config": self.encoder_config,
                "unsaved_changes": self._dirty,
                "disk_bytes": sum(f.stat().st_size for f in state_dir.iterdir()),
            }

    def __repr__(self) -> str:
        return f"ImageIndex({str(self.root)!r}, count={len(self)}, kind={self._manifest['kind']!r})"


# ===================================================================== sharded search

_SHARD_SHIFT = 48  # a hit's global key is shard << 48 | id: ids stay below 2**48 (2.8e14)
_ID_MASK = (1 << _SHARD_SHIFT) - 1


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
                np.where(ids >= 0, (n << _SHARD_SHIFT) | ids, -1)
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
        shard_of = keys >> _SHARD_SHIFT
        for n in np.unique(shard_of):
            mine = shard_of == n
            out[mine] = self.shards[n].reconstruct(keys[mine] & _ID_MASK)
        return out


def _search_hits(
    searchable: _Searchable,
    shards: Sequence[ImageIndex],
    queries: np.ndarray,
    k: int,
    query_expansion: int,
) -> list[list[SearchHit]]:
    """Search (with optional average QE) and turn keys into catalog hits of their shards."""
    q = _as_matrix(queries, searchable.dim, "queries", allow_vector=True)
    k = _check_k(k)
    if query_expansion:
        scores, keys = average_query_expansion(q, searchable, query_expansion, n_results=k)
    else:
        scores, keys = searchable.search(q, k)
    # A VectorIndex's keys are ids (shard 0); _ShardedVectors' keys carry the shard too.
    shard_of, ids = keys >> _SHARD_SHIFT, keys & _ID_MASK
    grid: list[list[SearchHit | None]] = [[None] * k for _ in range(len(q))]
    for n, shard in enumerate(shards):
        mine = (keys >= 0) & (shard_of == n)
        rows, cols = np.nonzero(mine)  # row-major, like the boolean indexing below
        for row, col, hit in zip(rows, cols, shard._hits(scores[mine], ids[mine], n), strict=True):
            grid[row][col] = hit
    return [[hit for hit in row if hit is not None] for row in grid]


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
        if len(self.shards) >= 1 << (63 - _SHARD_SHIFT):
            raise ValueError(f"at most {1 << (63 - _SHARD_SHIFT)} shards")

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
            return _search_hits(searchable, self.shards, vectors, k, query_expansion)
