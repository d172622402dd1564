"""In-memory vector search: :class:`VectorIndex`, faiss inner-product search with stable int64 ids.

Kinds: exact (``IndexFlatIP``), HNSW (``IndexHNSWFlat``), IVF-PQ (``IndexIVFPQ``), and two that
re-rank a short list exactly with the float vectors (:mod:`selret.search.refined`): ``"ivf"``
(IVF-PQ fast-scan short list) and ``"binary"`` (Hamming short list of ITQ codes); or ``"auto"``,
which picks one by size (:func:`choose_kind`). Scores are inner products; with unit-norm
vectors (what ``selret.encoding.encoder`` produces) they are cosine similarities, higher is better.
Result rows are padded with id ``-1`` and score ``-inf`` when fewer than ``k`` vectors are indexed.
SPEC section 8.

A query's results do not depend on the batch it is searched in: exact search runs
:func:`~selret.search.kernels.exact_top_k`, the other kinds score each query on its own (the
re-ranking kinds with :func:`~selret.search.kernels.rescore_top_k`), and no faiss setting is
changed at import (see :mod:`selret.search.kernels`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import faiss
import numpy as np

from selret.files import atomic_write
from selret.search.arrays import as_ids, as_matrix, check_k, recall_at_k
from selret.search.binary import BinaryShortlist
from selret.search.faiss_files import read_faiss
from selret.search.ivf import IVFShortlist, new_ivfpq
from selret.search.kernels import blas_brute_force, exact_top_k, flat_vectors
from selret.search.refined import RefinedIndex, read_refined, write_refined

__all__ = [
    "AUTO_EXACT_MAX",
    "DEFAULT_K_FACTOR",
    "HNSW_COMPACT_FRACTION",
    "IVF_RETRAIN_GROWTH",
    "KINDS",
    "VectorIndex",
    "as_matrix",
    "check_k",
    "choose_kind",
    "recall_at_k",  # re-exported from selret.search.arrays, like as_matrix and check_k
]

KINDS = ("exact", "hnsw", "ivfpq", "ivf", "binary")
"""The concrete index kinds; ``"auto"`` resolves to one of them."""

REFINED_KINDS = ("ivf", "binary")
"""The kinds that re-rank a short list exactly (:class:`~selret.search.refined.RefinedIndex`)."""

AUTO_EXACT_MAX = 20_000
"""``kind="auto"``: exact search below this many vectors, ``"ivf"`` from here. Brute force reads
every vector for every query (2 KB per 512-D vector): about 5 ms per query on one core at 20k,
20 ms at 100k, against ~1 ms for ``"ivf"`` at recall@10 >= 0.95 (``benchmarks/search_speed.py``)."""

IVF_RETRAIN_GROWTH = 4
"""An ``"ivf"`` index whose ``nlist`` is left to its default is retrained on all its vectors when
it has grown to this many times the size it was trained on, so that its lists follow its size."""

CALIBRATE_MIN = 1000
"""A re-ranking index smaller than this is not calibrated: ``"ivf"`` visits all its lists."""

CALIBRATION_MARGIN = 0.02
"""Calibration aims at ``target_recall`` plus this: its estimate, on 500 indexed vectors each
searched for the others, came out ~0.01-0.02 above the recall of new queries in tests."""

DEFAULT_K_FACTOR = {"ivf": 10, "binary": 50}
"""Short list length per result (``max(k, 10) * k_factor`` candidates re-ranked) of the
re-ranking kinds."""

HNSW_COMPACT_FRACTION = 0.25
"""HNSW removal leaves tombstones; the graph is rebuilt once they exceed this share of it."""

_INT64_MAX = np.iinfo(np.int64).max
_PARAMS = (
    "hnsw_m", "ef_construction", "ef_search", "nlist", "pq_m", "nprobe", "k_factor", "n_bits",
    "binary_rotation", "target_recall", "seed",
)  # fmt: skip


def choose_kind(n: int) -> str:
    """The index kind ``kind="auto"`` uses for ``n`` vectors.

    ``"exact"`` below :data:`AUTO_EXACT_MAX` (20k), ``"ivf"`` (IVF-PQ fast-scan short list, exact
    re-ranking) from there: it held recall@10 >= 0.95 against exact search at 100k and 1M where
    HNSW needed a slower search for the same recall (``benchmarks/search_speed.py``).
    """
    return "exact" if n < AUTO_EXACT_MAX else "ivf"


# ===================================================================== VectorIndex


class VectorIndex:
    """In-memory inner-product search over float32 vectors with caller-chosen int64 ids.

    Parameters
    ----------
    dim : vector dimension D.
    kind : ``"exact"`` (brute force, ``IndexFlatIP``), ``"hnsw"`` (graph, ``IndexHNSWFlat``),
        ``"ivfpq"`` (inverted lists + product quantization, ``IndexIVFPQ``: needs training, stores
        ~``pq_m`` bytes per vector, scores are approximate), ``"ivf"`` (inverted lists, 4-bit PQ
        fast-scan short list of ``max(k, 10) * k_factor`` candidates re-ranked exactly: needs
        training, keeps the float vectors plus ``pq_m / 2`` bytes), ``"binary"`` (Hamming short list of
        ``n_bits``-bit codes, re-ranked exactly: keeps the float vectors plus ``n_bits / 8``
        bytes), or ``"auto"``: the kind follows the size, see :func:`choose_kind`. An ``"auto"``
        index that grows past a threshold on :meth:`add` is rebuilt in the next kind (a one-off
        cost); it never moves back down.
    hnsw_m, ef_construction, ef_search : HNSW graph degree, build beam and search beam.
    nlist : IVF inverted lists; default for ``n`` training vectors ``min(sqrt(n), n / 39)``
        (``"ivfpq"``) or ``min(4 sqrt(n), n / 39)`` (``"ivf"``, which is then retrained as it
        grows, see :data:`IVF_RETRAIN_GROWTH`). k-means runs on at most 64 vectors per list.
    pq_m : PQ sub-quantizers (must divide ``dim``); default ~``dim / 8`` bytes (``"ivfpq"``, 8
        bits each) or ``dim / 2`` of 4 bits (``"ivf"``, two dimensions per sub-quantizer).
    nprobe : lists visited per query; default ``min(nlist, 32)`` (``"ivfpq"``) or calibrated
        (``"ivf"``, see ``target_recall``).
    k_factor : short list length per result of ``"ivf"`` (default 10) and ``"binary"`` (default
        calibrated, 50 until then).
    n_bits, binary_rotation : code length (default ``dim``) and projection of ``"binary"``
        (``"itq"``, ``"pca"``, ``"random"`` or ``"none"``, see :mod:`selret.search.binary`).
    target_recall : what calibration aims at for the effort left to it (``nprobe`` of
        ``"ivf"``, ``k_factor`` of ``"binary"``): the least effort whose recall@10 against exact
        search, measured on 200 indexed vectors searched for their nearest others, reaches
        ``target_recall`` + :data:`CALIBRATION_MARGIN`. Done once the index holds
        :data:`CALIBRATE_MIN` vectors and again each time it has doubled; it costs about one
        exact search of 200 queries.
    seed : seed of the k-means, of the binary projection and of the calibration sample.

    All kinds but IVF-PQ keep the raw vectors (:meth:`reconstruct` is exact) and return exact
    scores; IVF-PQ ranks by its codes and misses much of the exact top-10 on 512-D vectors.

    HNSW graphs cannot delete nodes: :meth:`remove` marks them as tombstones, which searches
    skip, and the graph is rebuilt when tombstones exceed :data:`HNSW_COMPACT_FRACTION` of it
    (or on :meth:`compact`). The IVF-PQ, IVF and binary indexes are trained on the first batch
    given to :meth:`add` unless :meth:`train` was called before. Not thread-safe.
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
        k_factor: int | None = None,
        n_bits: int | None = None,
        binary_rotation: str = "itq",
        target_recall: float = 0.95,
        seed: int = 0,
    ):
        if kind not in (*KINDS, "auto"):
            raise ValueError(f"kind must be one of {(*KINDS, 'auto')}, got {kind!r}")
        if int(dim) < 1:
            raise ValueError(f"dim must be positive, got {dim!r}")
        if pq_m is not None and dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide dim={dim}")
        if k_factor is not None and (int(k_factor) != k_factor or k_factor < 1):
            raise ValueError(f"k_factor must be a positive integer, got {k_factor!r}")
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
        self.dim = int(dim)
        self.kind = kind
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.nlist = nlist
        self.pq_m = pq_m
        self.nprobe = nprobe
        self.k_factor = k_factor
        self.n_bits = n_bits
        self.binary_rotation = binary_rotation
        self.target_recall = float(target_recall)
        self.seed = seed
        self._ids = np.zeros(0, np.int64)  # live ids, in insertion order
        self._n_dead = 0  # HNSW tombstones
        self._index_kind = choose_kind(0) if kind == "auto" else kind
        self._index = None if self._index_kind == "ivfpq" else self._new_index(self._index_kind)
        if self._index_kind == "binary":  # check the code settings now rather than at training
            BinaryShortlist(self.dim, n_bits, binary_rotation, seed).encoder.check(self.dim)

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
        """False only for an IVF-PQ, IVF or binary index that has not been trained yet."""
        if isinstance(self._index, RefinedIndex):
            return self._index.trained
        return self._index is not None

    @property
    def ids(self) -> np.ndarray:
        """The ids of the indexed vectors, in insertion order (a copy)."""
        return self._ids.copy()

    @property
    def params(self) -> dict[str, Any]:
        """The constructor arguments besides ``dim`` and ``kind`` (JSON-serialisable)."""
        return {name: getattr(self, name) for name in _PARAMS}

    @property
    def settings(self) -> dict[str, Any]:
        """The settings in use, defaults resolved (e.g. the ``nprobe`` an ``"ivf"`` index picked),
        with ``scan_bytes``: what a query reads per vector it scores in the first pass."""
        kind, dim = self._index_kind, self.dim
        if kind in REFINED_KINDS:
            self._sync_refined()
            return {**self._index.shortlist.settings, "k_factor": self._index.k_factor}
        if kind == "ivfpq":
            return {
                "nlist": self.nlist,
                "pq_m": self.pq_m,
                "nprobe": self.nprobe,
                "scan_bytes": self.pq_m,
            }
        names = ("hnsw_m", "ef_construction", "ef_search") if kind == "hnsw" else ()
        return {**{name: getattr(self, name) for name in names}, "scan_bytes": 4 * dim}

    def _sync_refined(self) -> None:
        # The attributes are the live settings, as for the faiss kinds in search(); what they
        # leave to the index comes from calibration, else from the defaults.
        found = self._index.calibrated
        kind = self._index_kind
        self._index.k_factor = self.k_factor or found.get("k_factor") or DEFAULT_K_FACTOR[kind]
        if kind == "ivf":
            self._index.shortlist.nprobe = self.nprobe or found.get("nprobe")

    def _calibrate_if_due(self) -> None:
        """Calibrate the effort a re-ranking index leaves to calibration (see ``target_recall``)
        once it holds CALIBRATE_MIN vectors, and again each time it has doubled since."""
        if self._index_kind not in REFINED_KINDS:
            return
        knob = self._index.shortlist.knob
        done = self._index.calibrated_at
        if getattr(self, knob) is None and self.ntotal >= max(CALIBRATE_MIN, 2 * done):
            self._sync_refined()
            base = self.k_factor or DEFAULT_K_FACTOR[self._index_kind]
            factors = (base,) if knob == "k_factor" or self.k_factor else (base, 2 * base, 4 * base)
            self._index.calibrate(self.target_recall + CALIBRATION_MARGIN, self.seed, factors)

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
        if kind in REFINED_KINDS:
            refined = RefinedIndex(
                self.dim, self._new_shortlist(kind), self.k_factor or DEFAULT_K_FACTOR[kind]
            )
            if train is not None:
                refined.train(train)
            return refined
        assert train is not None and kind == "ivfpq"
        index = new_ivfpq(self.dim, train, self.nlist, self.pq_m, self.nprobe, self.seed)
        self.nlist, self.pq_m, self.nprobe = index.nlist, index.pq.M, index.nprobe
        return index

    def _new_shortlist(self, kind: str):
        if kind == "binary":
            return BinaryShortlist(self.dim, self.n_bits, self.binary_rotation, self.seed)
        return IVFShortlist(self.dim, self.nlist, self.pq_m, self.nprobe, self.seed)

    def _add_to_faiss(self, x: np.ndarray, ids: np.ndarray) -> None:
        if self._index_kind in REFINED_KINDS:
            self._index.add(x, ids)
        elif self._index_kind == "ivfpq":  # assigns the vectors to lists by brute force
            with blas_brute_force():
                self._index.add_with_ids(x, ids)
        else:
            self._index.add_with_ids(x, ids)

    def train(self, vectors: np.ndarray) -> None:
        """Train an empty IVF-PQ, IVF or binary index on ``vectors`` (a representative sample of
        what it will hold); a no-op for the other kinds."""
        x = as_matrix(vectors, self.dim, "vectors")
        if self._index_kind not in ("ivfpq", *REFINED_KINDS):
            return
        if self.ntotal:
            raise ValueError(f"cannot retrain an {self._index_kind} index that holds vectors")
        self._index = self._new_index(self._index_kind, x)

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, ids) of every indexed vector; decoded (approximate) for IVF-PQ."""
        if self._index is None or not self.ntotal:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        if self._index_kind in REFINED_KINDS:
            return self._index.live()
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
        """Rebuild an HNSW graph without its tombstones, or drop the removed rows of a re-ranking
        kind; a no-op for other kinds."""
        if self._n_dead:
            self._rebuild("hnsw")
        elif self._index_kind in REFINED_KINDS and self.is_trained:
            self._index.compact()

    def _outgrown(self, n: int) -> bool:
        """An ``"ivf"`` index with default lists that ``n`` vectors make too coarse: retrain."""
        if self._index_kind != "ivf" or self.nlist is not None or not self.is_trained:
            return False
        return n >= IVF_RETRAIN_GROWTH * self._index.shortlist.n_train

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` (n, D) float32 under ``ids`` (n,) int64 >= 0, unique and not present."""
        x = as_matrix(vectors, self.dim, "vectors")
        new_ids = as_ids(ids)
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
        if self._outgrown(self.ntotal + len(x)):
            self._rebuild("ivf", extra=x)
        if self._index is None:  # untrained IVF-PQ: learn it from this first batch
            self._index = self._new_index("ivfpq", x)
        self._add_to_faiss(x, new_ids)
        self._ids = np.concatenate([self._ids, new_ids])
        self._calibrate_if_due()

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove the vectors with these ids; unknown ids are ignored. Returns how many went."""
        gone = np.unique(as_ids(ids if isinstance(ids, np.ndarray) else list(ids)))
        gone = gone[np.isin(gone, self._ids)]
        if not len(gone):
            return 0
        if self._index_kind in REFINED_KINDS:
            self._index.remove(gone)
        elif self._index_kind == "hnsw":
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
        if self._index_kind in REFINED_KINDS:
            self._sync_refined()
            return self._index.search(q, k)
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

        Exact for every kind but ``"ivfpq"``, decoded from the PQ codes there.
        """
        scalar = np.ndim(ids) == 0
        wanted = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        missing = wanted[~np.isin(wanted, self._ids)]
        if len(missing):
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        if not len(wanted):
            return np.zeros((0, self.dim), np.float32)
        if self._index_kind in REFINED_KINDS:
            x = self._index.reconstruct(wanted)
        else:
            x = self._index.reconstruct_batch(wanted)
        return x[0] if scalar else x

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to one file (tombstones and the kind included), atomically: a faiss file,
        or for ``"ivf"`` and ``"binary"`` an npz file (:func:`~selret.search.refined.write_refined`).

        An index that has not been trained has nothing to write: ValueError.
        """
        if not self.is_trained:
            raise ValueError(
                f"an untrained {self._index_kind} index cannot be saved: add or train first"
            )
        if self._index_kind in REFINED_KINDS:
            header = {"kind": self._index_kind, "dim": self.dim, "params": self.params}
            atomic_write(path, lambda fh: write_refined(fh, self._index, header))
            return
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
        if zipfile.is_zipfile(path):
            header, state = read_refined(path)
            found = header["kind"]
            if kind not in (None, "auto", found):
                raise ValueError(f"{path}: holds a {found!r} index, not {kind!r}")
            loaded = cls(header["dim"], kind or found, **{**params, **header["params"]})
            loaded._index_kind = found
            loaded._index = loaded._new_index(found)
            loaded._index.load_state(state)
            loaded._ids = loaded._index.live_ids()
            return loaded
        index, found, ids, stored = read_faiss(path)
        params.update(stored)
        if kind not in (None, "auto", found):
            raise ValueError(f"{path}: holds a {found!r} index, not {kind!r}")
        loaded = cls(index.d, "auto" if kind == "auto" else found, **params)
        loaded._index, loaded._index_kind, loaded._ids = index, found, ids
        loaded._n_dead = index.ntotal - len(ids)
        return loaded
