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
import os
from collections.abc import Iterator

__all__ = ["describe_pools", "limit_threads", "set_threads", "single_threaded_blas"]


_POOL_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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
    # Libraries loaded later (scipy, sklearn, cv2 each bring their own BLAS / OpenMP) size their
    # pools from these variables when they load; the ones already loaded are limited below.
    for var in _POOL_VARIABLES:
        os.environ[var] = str(n)
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


_blas_controller = None


def single_threaded_blas():
    """A ``with`` block in which the BLAS pools run on one thread (their size comes back after
    it). For the many small products of encoding: on more than one thread they cost several
    times the CPU (a partner thread spins at every barrier), 8x on the 2-core machine here
    (benchmarks/RESULTS.md). Pools already at one thread are not touched: setting an OpenBLAS
    pool's size, even to the size it has, made the next products 0.6 ms slower (a 6 ms encode
    on one thread became 6.6 ms). Blocks on several threads at once may leave a pool at 1 until
    the last one ends."""
    global _blas_controller
    import sys

    from threadpoolctl import ThreadpoolController

    # A native library comes with an import, so the pools are looked up again when the module
    # count changed (scipy, sklearn and cv2 each bring their own BLAS).
    if _blas_controller is None or _blas_controller[0] != len(sys.modules):
        blas = ThreadpoolController().select(user_api="blas")
        _blas_controller = (len(sys.modules), blas)
    blas = _blas_controller[1]
    if all(lib.get_num_threads() == 1 for lib in blas.lib_controllers):
        return contextlib.nullcontext()
    return blas.limit(limits=1)


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
