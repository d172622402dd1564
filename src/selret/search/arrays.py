"""Array checks shared by the search modules, recall@k of approximate search results, and the
settings grid that calibration searches."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_ids", "as_matrix", "check_k", "effort_steps", "recall_at_k"]


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


def as_ids(ids: Any) -> np.ndarray:
    """``ids`` as a flat int64 array of non-negative values, or a ValueError."""
    a = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if (a < 0).any():
        raise ValueError("ids must be >= 0 (-1 marks padding in search results)")
    return a


def check_k(k: int) -> int:
    """``k`` as an int, or a ValueError unless it is a positive integer."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


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


EFFORT_STEP = 1.1
"""Ratio between the efforts calibration can choose. Search time grows with the effort, so the
step is what calibration may overshoot by: at 20 % steps a 1M x 512 ``ivf`` index got nprobe 572
where 480 reached the target (5.5 against ~4.5 ms per query); one more bisection step of 500
sample searches is the price of 10 %."""


def effort_steps(top: int) -> list[int]:
    """Increasing integers from 1 to ``top``, each about ``EFFORT_STEP`` times the one before."""
    steps = {top}
    value = 1.0
    while value < top:
        steps.add(int(value))
        value = max(value * EFFORT_STEP, value + 1)
    return sorted(steps)
