"""Inverted-file (IVF) indexes of :class:`~selret.search.vectors.VectorIndex`: the ``"ivfpq"`` kind
(:func:`new_ivfpq`, ranked by its 8-bit PQ codes) and the short list of the ``"ivf"`` kind
(:class:`IVFShortlist`, 4-bit PQ fast-scan, re-ranked exactly by :mod:`selret.search.refined`).

Both cluster with spherical k-means (centroids on the unit sphere suit inner products of unit
vectors) on a sample of at most 64 training vectors per list (faiss: 256), 4x faster to train.
"""

from __future__ import annotations

import faiss
import numpy as np

from selret.search.kernels import blas_brute_force

__all__ = ["IVFShortlist", "ivf_ids", "new_ivfpq"]

_TRAIN_POINTS_PER_CENTROID = 64


def _train(index, x: np.ndarray, seed: int) -> None:
    """Train an IVF-PQ ``index`` (coarse k-means, then PQ) on ``x`` with the settings above."""
    index.cp.spherical = True
    for clustering in (index.cp, index.pq.cp):
        clustering.seed = seed
        clustering.max_points_per_centroid = _TRAIN_POINTS_PER_CENTROID
    # The PQ of a small collection learns from fewer than faiss's 39 points per centroid, which
    # faiss would warn about once per sub-quantizer (256 lines at 512-D); its recall is what
    # calibration measures, and the size floor is ``_check_training``'s.
    index.pq.cp.min_points_per_centroid = 1
    with blas_brute_force():  # k-means assigns by brute force: BLAS is 10x faster from 20 queries
        index.train(x)


def _check_training(n_train: int, min_train: int, kind: str) -> None:
    if n_train < min_train:
        raise ValueError(
            f"a {kind} index needs at least {min_train} training vectors here, got {n_train}: "
            "add a larger first batch, call train() on a sample, pass a smaller nlist, or use "
            "kind='exact'/'hnsw'"
        )


def new_ivfpq(
    dim: int, x: np.ndarray, nlist: int | None, pq_m: int | None, nprobe: int | None, seed: int
):
    """A trained, empty ``IndexIVFPQ`` (8-bit codes, inner product) for the ``"ivfpq"`` kind.

    ``nlist`` defaults to ``min(sqrt(n), n / 39)`` for ``n`` training vectors, ``pq_m`` to ~``dim
    / 8`` (one byte per 8 floats, a 32x compression), ``nprobe`` to ``min(nlist, 32)``. The
    index takes the caller's int64 ids itself (no IDMap, whose remove assumes flat renumbering);
    a hashtable direct map gives reconstruct and remove.
    """
    nlist = nlist or max(1, min(int(np.sqrt(len(x))), len(x) // 39))
    pq_m = pq_m or max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
    _check_training(len(x), max(256, nlist), "ivfpq")  # 2**8 centroids per sub-quantizer
    index = faiss.IndexIVFPQ(
        faiss.IndexFlatIP(dim), dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT
    )
    _train(index, x, seed)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.nprobe = nprobe or min(nlist, 32)
    return index


def ivf_ids(index) -> np.ndarray:
    """All ids stored in the inverted lists of an IVF index."""
    lists = index.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(index.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class IVFShortlist:
    """Labels (row slots) of the vectors nearest a query by IVF-PQ fast-scan inner product.

    ``nlist`` lists (default ``min(4 sqrt(n), n / 39)`` for ``n`` training vectors), ``pq_m``
    4-bit sub-quantizers of the residual to the list centroid (default ``dim / 2``: two dimensions
    per sub-quantizer, ``dim / 4`` bytes per vector; coarser codes lost recall that no longer short
    list could win back on realistic 512-D vectors), ``nprobe`` lists visited per query (default:
    all of them, until :meth:`~selret.search.refined.RefinedIndex.calibrate` sets it). Fast-scan reads ``pq_m / 2`` bytes per visited vector instead of
    ``4 dim``, which keeps a million-vector scan within the memory bandwidth of one core; coding
    the residual rather than the vector (``by_residual``) makes the codes far finer.
    """

    kind = "ivf"
    knob = "nprobe"  # the effort calibrated

    def knob_max(self) -> int:
        return self.index.nlist

    def __init__(
        self, dim: int, nlist: int | None, pq_m: int | None, nprobe: int | None, seed: int
    ):
        self.dim, self.nlist, self.pq_m, self.nprobe, self.seed = dim, nlist, pq_m, nprobe, seed
        self.index = None
        self.n_train = 0

    def train(self, x: np.ndarray) -> None:
        nlist = self.nlist or max(1, min(int(4 * np.sqrt(len(x))), len(x) // 39))
        pq_m = self.pq_m or max(m for m in range(1, self.dim // 2 + 1) if self.dim % m == 0)
        _check_training(len(x), max(64, nlist), "ivf")  # 2**4 centroids per sub-quantizer
        index = faiss.IndexIVFPQFastScan(
            faiss.IndexFlatIP(self.dim), self.dim, nlist, pq_m, 4, faiss.METRIC_INNER_PRODUCT
        )
        index.by_residual = True
        _train(index, x, self.seed)
        self.index, self.n_train = index, len(x)

    @property
    def settings(self) -> dict[str, int]:
        """The values in use: lists, sub-quantizers, lists visited per query."""
        nlist, pq_m = self.index.nlist, self.index.pq.M
        nprobe = min(nlist, self.nprobe or nlist)  # every list until calibrated
        return {"nlist": nlist, "pq_m": pq_m, "nprobe": nprobe, "scan_bytes": (pq_m + 1) // 2}

    def add(self, x: np.ndarray, slots: np.ndarray) -> None:
        with blas_brute_force():  # list assignment is a brute-force search over the centroids
            self.index.add_with_ids(x, slots)

    def remove(self, slots: np.ndarray) -> None:
        self.index.remove_ids(faiss.IDSelectorBatch(slots))

    def reset(self) -> None:
        self.index.reset()

    def search(self, q: np.ndarray, n: int) -> np.ndarray:
        # Each query is scored on its own (its own look-up tables); the lists it visits come from
        # faiss's brute force over the centroids, BLAS only from 128000 queries by default.
        params = faiss.SearchParametersIVF(nprobe=self.settings["nprobe"])
        return self.index.search(q, n, params=params)[1]

    def state(self) -> dict[str, np.ndarray]:
        return {"index": faiss.serialize_index(self.index), "n_train": np.array(self.n_train)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.index = faiss.deserialize_index(state["index"])  # already of its own class
        self.n_train = int(state["n_train"])
