"""Admission and micro-batching of searches: :class:`Admission` and :class:`MicroBatcher`.

``Admission`` bounds the searches in progress (decoding, waiting or running). One past the bound is
refused at once with :class:`ServiceBusyError` (HTTP 503 with Retry-After) rather than queued:
an unbounded queue only turns overload into ever longer waits and more memory.

``MicroBatcher`` runs a ``process(items) -> results`` function on one worker thread, over groups
of the items submitted from any thread: a group is whatever is queued when the worker is free (up
to ``max_batch``), plus what arrives within ``max_wait_s`` while more items are known to be on
their way. A lone request therefore never waits, and under load one backbone forward, one encode
and one index search serve many requests.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Generic, TypeVar

from selret.errors import SelretError

__all__ = ["Admission", "MicroBatcher", "ServiceBusyError"]

T = TypeVar("T")
R = TypeVar("R")

#: Bounds of the Retry-After the service suggests, in seconds.
_RETRY_AFTER_RANGE = (1, 60)
# Weight of the newest batch in the running estimate of the seconds one search costs.
_EWMA_WEIGHT = 0.2


class ServiceBusyError(SelretError):
    """Too many searches are in progress; ``retry_after`` (s) is when one may try again."""

    def __init__(self, in_progress: int, limit: int, retry_after: int):
        self.in_progress = in_progress
        self.limit = limit
        self.retry_after = retry_after
        super().__init__(
            f"the server is busy: {in_progress} searches in progress, the limit is {limit}; "
            f"retry in {retry_after} s"
        )


class Admission:
    """A bound on the searches in progress, with an estimate of when a slot frees up."""

    def __init__(self, limit: int):
        self.limit = limit
        self.rejected = 0
        self._in_progress = 0
        self._seconds_per_search: float | None = None
        self._lock = threading.Lock()

    @property
    def in_progress(self) -> int:
        return self._in_progress

    def enter(self) -> None:
        """Take a slot; raises ServiceBusyError when all are taken. Pair with :meth:`leave`."""
        with self._lock:
            if self._in_progress >= self.limit:
                self.rejected += 1
                raise ServiceBusyError(self._in_progress, self.limit, self._retry_after())
            self._in_progress += 1

    def leave(self) -> None:
        with self._lock:
            self._in_progress -= 1

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the block (:meth:`enter` ... :meth:`leave`)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def record(self, seconds: float, searches: int) -> None:
        """A batch of ``searches`` took ``seconds``: update the per-search cost estimate."""
        if searches < 1:
            return
        per = seconds / searches
        with self._lock:
            old = self._seconds_per_search
            self._seconds_per_search = per if old is None else old + _EWMA_WEIGHT * (per - old)

    def _retry_after(self) -> int:
        # Time to work through the searches ahead, at the measured cost per search.
        cost = self._seconds_per_search or 0.0
        low, high = _RETRY_AFTER_RANGE
        return int(min(high, max(low, math.ceil(self._in_progress * cost))))


class _Pending(Generic[T, R]):
    __slots__ = ("future", "item")

    def __init__(self, item: T):
        self.item = item
        self.future: Future[R] = Future()


class MicroBatcher(Generic[T, R]):
    """Groups items submitted from many threads and runs ``process`` on each group, one at a time.

    ``process(items)`` returns one result per item, in order; an exception in its place is raised
    to that item's submitter only, and an exception raised by ``process`` itself to every item of
    the group. ``more_coming()`` tells how many items are about to be submitted (e.g. queries being
    decoded): the worker waits up to ``max_wait_s`` for them, never when none are coming.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch: int,
        max_wait_s: float,
        more_coming: Callable[[], int] = lambda: 0,
        name: str = "selret-batcher",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.process = process
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.more_coming = more_coming
        self.batches = 0
        self.items = 0
        self.largest = 0
        self._queue: deque[_Pending[T, R]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        """Queue ``item``; its future gets its result (or exception) once its group ran."""
        pending: _Pending[T, R] = _Pending(item)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker after the group in progress; queued items are cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            while self._queue:
                self._queue.popleft().future.cancel()

    def _next_group(self) -> list[_Pending[T, R]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.max_batch and self.more_coming() > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            live = [p for p in group if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self.process([p.item for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"process gave {len(results)} results for {len(live)} items")
            except Exception as exc:  # handed to every submitter of the group
                for p in live:
                    p.future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(live)
            self.largest = max(self.largest, len(live))
            for p, result in zip(live, results, strict=True):
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
