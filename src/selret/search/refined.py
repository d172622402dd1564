"""Approximate search with exact re-ranking: :class:`RefinedIndex`, the ``"ivf"`` and ``"binary"``
kinds of :class:`~selret.search.vectors.VectorIndex`.

A compressed index gives each query a short list of ``max(k, 10) * k_factor`` candidates; the float vectors
re-rank it with exact inner products (:func:`~selret.search.kernels.rescore_top_k`), so the
returned scores are exact and the top ``k`` is exact whenever the short list holds it. The short
list comes from

* :class:`~selret.search.ivf.IVFShortlist` (``"ivf"``): inverted lists, residuals coded by 4-bit
  PQ and scanned with faiss's fast-scan kernels;
* :class:`~selret.search.binary.BinaryShortlist` (``"binary"``): Hamming distance between the
  codes of a :class:`~selret.search.binary.BinaryEncoder` (ITQ by default).

How long the short list is, or how many lists it visits, can be *calibrated* on the collection
itself (:meth:`RefinedIndex.calibrate`): the least effort whose recall@10 on a sample of indexed
vectors, each searched for its 10 nearest others, reaches a target. The effort then follows the
data: clustered collections need few lists, near-isotropic ones many.

Vectors live in rows ("slots") in insertion order; the short list is labelled by slot. Removal
takes the slots out of the short list and marks them dead (id -1); the dead rows are dropped, and
the short list rebuilt on its learned parameters, once they exceed a quarter of the rows.
"""

from __future__ import annotations

import json
import logging
from typing import Any, BinaryIO

import faiss
import numpy as np

from selret.search.arrays import effort_steps, recall_at_k
from selret.search.kernels import exact_top_k, flat_vectors, rescore_top_k

__all__ = ["RefinedIndex", "read_refined", "write_refined"]

logger = logging.getLogger(__name__)

MIN_K = 10
"""The short list is at least ``MIN_K * k_factor`` long: a top-1 is no easier than a top-10."""
MAX_SHORTLIST = 10_000
"""Calibration never lengthens a short list past this many rows."""
CALIBRATION_QUERIES = 500
"""Indexed vectors that :meth:`RefinedIndex.calibrate` searches (their own match left out)."""
_COMPACT_FRACTION = 0.25  # dead rows tolerated before the rows and the short list are rebuilt
_MAGIC = "selret-refined-index"
_FORMAT = 1


class RefinedIndex:
    """Float vectors under int64 ids, searched through a short list and re-ranked exactly.

    ``shortlist`` is an untrained short-list index (``train``, ``add(x, slots)``, ``remove(slots)``,
    ``reset``, ``search(q, n) -> slots``, ``state`` / ``load_state``); :meth:`train` (or the first
    :meth:`add`) trains it. A query's short list holds ``max(k, MIN_K) * k_factor`` candidates. Ids are
    checked by the caller (:class:`~selret.search.vectors.VectorIndex`): unique, >= 0, absent.
    """

    def __init__(self, dim: int, shortlist, k_factor: int):
        self.dim = dim
        self.shortlist = shortlist
        self.k_factor = int(k_factor)
        self.trained = False
        self.calibrated: dict[str, int] = {}  # the effort found by calibrate()
        self.calibrated_at = 0  # ... on this many vectors
        self._rows = faiss.IndexFlatIP(dim)  # slot -> float vector, dead rows included
        self._slot_ids = np.zeros(0, np.int64)  # slot -> id, -1 once removed
        self._slot_order: np.ndarray | None = None  # argsort of _slot_ids, rebuilt on demand

    @property
    def n_dead(self) -> int:
        return int((self._slot_ids < 0).sum())

    def train(self, x: np.ndarray) -> None:
        self.shortlist.train(x)
        self.trained = True

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        if not self.trained:
            self.train(x)
        slots = np.arange(len(self._slot_ids), len(self._slot_ids) + len(x), dtype=np.int64)
        self.shortlist.add(x, slots)
        self._rows.add(x)
        self._slot_ids = np.concatenate([self._slot_ids, ids])
        self._slot_order = None

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (all present: checked by the caller)."""
        if self._slot_order is None:
            self._slot_order = np.argsort(self._slot_ids, kind="stable")
        sorted_ids = self._slot_ids[self._slot_order]
        return self._slot_order[np.searchsorted(sorted_ids, ids)]

    def remove(self, ids: np.ndarray) -> None:
        slots = self._slots(ids)
        self.shortlist.remove(slots)
        self._slot_ids[slots] = -1
        self._slot_order = None
        if self.n_dead > _COMPACT_FRACTION * len(self._slot_ids):
            self.compact()

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, ids) of the live rows, in insertion order."""
        keep = self._slot_ids >= 0
        return flat_vectors(self._rows)[keep].copy(), self._slot_ids[keep].copy()

    def live_ids(self) -> np.ndarray:
        return self._slot_ids[self._slot_ids >= 0].copy()

    def compact(self) -> None:
        """Drop the dead rows and rebuild the short list on its learned parameters."""
        x, ids = self.live()
        self._rows.reset()
        self._slot_ids = np.zeros(0, np.int64)
        self._slot_order = None
        self.shortlist.reset()
        if len(ids):
            self.add(x, ids)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return flat_vectors(self._rows)[self._slots(ids)]

    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        slots = self.shortlist.search(q, max(k, MIN_K) * self.k_factor)
        return rescore_top_k(flat_vectors(self._rows), q, slots, k)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self._search_rows(q, k)
        return scores, np.where(rows >= 0, self._slot_ids[rows], -1)

    def calibrate(self, target: float, seed: int, k_factors: tuple[int, ...] = ()) -> dict:
        """Set the short list's effort (``shortlist.knob``: ``"nprobe"``, or ``"k_factor"``) to
        the least value whose recall@10 on a sample of the indexed vectors reaches ``target``;
        returns the settings chosen (also kept in :attr:`calibrated`).

        Each sampled vector is searched for its ``MIN_K + 1`` nearest rows and its own row left
        out; the truth is exact search over all rows. Recall grows with the effort, so ~1.1x steps
        of it are bisected: a handful of sample searches, each cheaper than the exact one. When
        even the most effort falls short (the codes, not the lists, lose the neighbours), the
        next of ``k_factors`` (longer short lists) is tried; failing all, the most is kept.
        """
        if self.n_dead:
            self.compact()
        rows = flat_vectors(self._rows)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(rows), min(len(rows), CALIBRATION_QUERIES), replace=False))
        q = np.ascontiguousarray(rows[pick])
        truth = _without(exact_top_k(rows, q, MIN_K + 1)[1], pick)

        recall = 0.0

        def reached(knob: str, value: int) -> bool:
            nonlocal recall
            self._set(knob, value)
            found = _without(self._search_rows(q, MIN_K + 1)[1], pick)
            recall = recall_at_k(found, truth, MIN_K)
            return recall >= target

        knob = self.shortlist.knob
        # A short list of over MAX_SHORTLIST re-ranked rows costs more than exact search of 20k.
        top = min(-(-len(rows) // MIN_K), MAX_SHORTLIST // MIN_K)
        most = top if knob == "k_factor" else self.shortlist.knob_max()
        values = effort_steps(most)
        for k_factor in k_factors or (self.k_factor,):
            self.k_factor = k_factor
            lo, hi = 0, len(values) - 1
            while lo < hi:  # the least index whose value reaches the target (or the last)
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if reached(knob, values[mid]) else (mid + 1, hi)
            if reached(knob, values[lo]):
                break
        else:
            effort = f"{knob}={values[lo]}"
            if knob != "k_factor":
                effort += f", k_factor={self.k_factor}"
            logger.warning(
                "%d vectors: recall@10 %.3f at the most effort (%s) falls short of the target "
                "%.3f; exact search (kind 'exact') or finer codes (larger pq_m) would reach it",
                len(rows), recall, effort, target,
            )  # fmt: skip
        self.calibrated = {knob: int(values[lo])}
        if knob != "k_factor":
            self.calibrated["k_factor"] = self.k_factor
        self.calibrated_at = len(rows)
        return self.calibrated

    def _set(self, knob: str, value: int) -> None:
        if knob == "k_factor":
            self.k_factor = value
        else:
            setattr(self.shortlist, knob, value)

    # ----------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        """Everything learned and stored, as arrays (one npz file)."""
        return {
            "rows": flat_vectors(self._rows),
            "slot_ids": self._slot_ids,
            "calibrated": np.array(json.dumps([self.calibrated, self.calibrated_at])),
            **{f"shortlist_{k}": v for k, v in self.shortlist.state().items()},
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        prefix = "shortlist_"
        self.shortlist.load_state(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        self._rows.reset()
        self._rows.add(np.ascontiguousarray(state["rows"], np.float32))
        self._slot_ids = np.asarray(state["slot_ids"], np.int64).copy()
        self._slot_order = None
        self.trained = True
        self.calibrated, self.calibrated_at = json.loads(str(state["calibrated"]))


def _without(rows: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(m, k+1) result rows -> (m, k): each row without its own entry ``own[i]`` (or its last)."""
    drop = rows == own[:, None]
    drop[~drop.any(axis=1), -1] = True
    return rows[~drop].reshape(len(rows), -1)


def write_refined(fh: BinaryIO, index: RefinedIndex, header: dict[str, Any]) -> None:
    """Write ``index`` and a JSON-serialisable ``header`` (kind, dim, parameters) as one npz file."""
    meta = json.dumps({"magic": _MAGIC, "format": _FORMAT, **header})
    np.savez(fh, header=np.array(meta), **index.state())


def read_refined(path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, state) of a file written by :func:`write_refined`, or a ValueError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            state = {name: z[name] for name in z.files if name != "header"}
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a selret re-ranking index file ({e})") from e
    if header.get("magic") != _MAGIC or header.get("format") != _FORMAT:
        raise ValueError(
            f"{path}: not a selret re-ranking index file of format {_FORMAT} "
            f"(magic {header.get('magic')!r}, format {header.get('format')!r})"
        )
    return header, state
