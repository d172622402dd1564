"""Numerical helpers shared by every stage (numpy or torch in, the same type out)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import faiss
import numpy as np
import torch

__all__ = ["blas_brute_force", "l2_normalize"]


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """``x`` divided by its l2 norm along ``axis`` (numpy array or torch tensor, same type back).

    Norms below ``eps`` are replaced by ``eps``, so a zero vector stays zero instead of becoming NaN.
    Integer input is promoted to float32; float dtypes are kept.
    """
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=axis, keepdim=True).clamp_min(eps)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps).astype(x.dtype, copy=False)


_BLAS_THRESHOLD = 20
_blas_lock = threading.Lock()
_blas_users = [0, 0]  # [blocks running, the value to restore]


@contextlib.contextmanager
def blas_brute_force() -> Iterator[None]:
    """Inside the block, faiss's brute force uses BLAS from 20 queries on, for speed.

    The setting is process-wide, so faiss calls of other threads see it meanwhile; nested and
    concurrent blocks share one change, undone when the last of them ends.
    """
    with _blas_lock:
        if not _blas_users[0]:
            _blas_users[1] = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = min(_blas_users[1], _BLAS_THRESHOLD)
        _blas_users[0] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users[0] -= 1
            if not _blas_users[0]:
                faiss.cvar.distance_compute_blas_threshold = _blas_users[1]
