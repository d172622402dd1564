"""Plumbing of batch extraction: decoding ahead of the network in threads, per-image argument
lists, progress bars. Used by :class:`selret.features.extractor.Extractor` only."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from tqdm.auto import tqdm

from selret.errors import ImageError

# What a bad image may raise while it is decoded and prepared. Anything else is a bug and must
# surface, not be filed as "this image failed".
DECODE_ERRORS = (ImageError, OSError, ValueError)


def per_image(values: Sequence | None, n: int, what: str, default=None) -> list:
    if values is None:
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} paths")
    return [default if v is None else v for v in values]


def prepared_stream(jobs, prepare, num_workers: int, prefetch: int) -> Iterator:
    """``(job, prepare(job))`` for every job, in order, computed up to ``prefetch`` jobs ahead in
    threads. A bad image's decode error is returned in place of its result, not raised: one bad
    image must not end the stream. Other exceptions (bugs) propagate."""

    def attempt(job):
        try:
            return prepare(job)
        except DECODE_ERRORS as exc:
            return exc

    if num_workers <= 0:
        for job in jobs:
            yield job, attempt(job)
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix="selret-decode") as pool:
        queue: deque[tuple[object, Future]] = deque()
        todo = iter(jobs)
        try:
            for job in todo:
                queue.append((job, pool.submit(attempt, job)))
                if len(queue) >= prefetch:
                    break
            while queue:
                job, future = queue.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    queue.append((nxt, pool.submit(attempt, nxt)))
                yield job, future.result()
        finally:
            # On an early exit (an exception, Ctrl-C, a closed generator) drop the queued work.
            for _, future in queue:
                future.cancel()


def progress_bar(total: int, progress: bool, desc: str) -> tqdm:
    return tqdm(total=total, disable=not progress, unit="img", desc=desc, dynamic_ncols=True)
