"""Plumbing of batch extraction: decoding ahead of the network in threads, per-image argument
lists, progress bars, the report of a run and its record of failed images. Used by
:class:`selret.features.extractor.Extractor` only."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

from tqdm.auto import tqdm

from selret.errors import ImageError

logger = logging.getLogger(__name__)

# What a bad image may raise while it is decoded and prepared. Anything else is a bug and must
# surface, not be filed as "this image failed".
DECODE_ERRORS = (ImageError, OSError, ValueError)


@dataclass
class ExtractionReport:
    """Outcome of one :meth:`Extractor.extract` run.

    ``n_cached`` counts images skipped because their features were already cached (or that repeat an
    earlier path of the same run). ``failed`` lists ``(path, reason)`` of images that could not be
    used; ``reason`` starts with the error type. ``damaged`` lists ``(path, reason)`` of images
    whose data is damaged but that were used anyway (``strict=False``; they are also counted as
    extracted or cached). ``seconds`` is the wall-clock time of the run.
    """

    n_total: int = 0
    n_extracted: int = 0
    n_cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failed)

    def summary(self) -> str:
        rate = self.n_extracted / self.seconds if self.seconds > 0 else 0.0
        damaged = f" ({len(self.damaged)} with damaged data)" if self.damaged else ""
        return (
            f"{self.n_total} images: {self.n_extracted} extracted, {self.n_cached} already cached"
            f"{damaged}, {self.n_failed} failed, in {self.seconds:.1f} s "
            f"({rate:.2f} images/s extracted)"
        )


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


class Failures:
    """Records failed (and damaged but used) images in the report of an extraction run, the
    optional JSONL log and the progress bar. ``report`` is an ExtractionReport; jobs have ``path``
    and ``index``."""

    def __init__(self, report, log: IO[str] | None, bar: tqdm):
        self.report, self.log, self.bar = report, log, bar
        self.errors: dict[int, BaseException] = {}

    def add(self, job, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, ImageError) else str(exc)
        self.report.failed.append((str(job.path), f"{type(exc).__name__}: {reason}"))
        self.errors[job.index] = exc
        logger.debug("%s failed: %s: %s", job.path, type(exc).__name__, reason)
        self._log(job, "failed", reason, error=type(exc).__name__)
        self.bar.update(1)
        self.bar.set_postfix(failed=self.report.n_failed, refresh=False)

    def damaged(self, job, reason: str) -> None:
        """An image used despite damaged data (strict=False): reported and logged, not failed."""
        self.report.damaged.append((str(job.path), reason))
        self._log(job, "damaged", reason)

    def _log(self, job, status: str, reason: str, **extra) -> None:
        if self.log is None:
            return
        record = {"path": str(job.path), "status": status, **extra, "reason": reason}
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
