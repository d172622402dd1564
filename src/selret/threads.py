"""One knob for the thread pools of every compute library selret uses.

torch (intra-op), faiss (OpenMP) and the BLAS / OpenMP pools numpy and scipy link to (through
threadpoolctl) each size their pools to all cores by default. On a shared or small machine that
oversubscribes the CPU: measured on the 2-core machine here under load, multi-threaded encoding took
9-25x the CPU time of single-threaded (benchmarks/README.md). Several worker processes on one
machine want one thread each. :func:`set_threads` limits all of them for the rest of the process
(``selret --threads N``, ``SELRET_THREADS``); :func:`limit_threads` does it for a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["describe_pools", "limit_threads", "set_threads"]


def _check(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a thread count must be a positive integer, got {n!r}")
    return n


def _set_torch_faiss(n_torch: int, n_faiss: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n_torch)
    faiss.omp_set_num_threads(n_faiss)


def set_threads(n: int) -> None:
    """Limit torch, faiss and the BLAS / OpenMP pools of this process to ``n`` threads."""
    from threadpoolctl import threadpool_limits

    _check(n)
    _set_torch_faiss(n, n)
    threadpool_limits(limits=n)  # not used as a context manager: the limit stays


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """:func:`set_threads` ``(n)`` inside the block; the previous limits come back after it."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    _check(n)
    old = torch.get_num_threads(), faiss.omp_get_max_threads()
    _set_torch_faiss(n, n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        _set_torch_faiss(*old)


def describe_pools() -> str:
    """A one-line summary of the thread pools and their sizes, for benchmark reports."""
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    pools = [f"{p['internal_api']}({p['num_threads']})" for p in threadpool_info()]
    return (
        f"torch({torch.get_num_threads()}), faiss({faiss.omp_get_max_threads()}), "
        "threadpoolctl: " + ", ".join(pools)
    )
