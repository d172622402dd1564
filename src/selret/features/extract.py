"""Batch extraction of conv feature maps into a :class:`~selret.features.cache.FeatureCache`, resumable.

:func:`extract_to_cache` skips images already cached, decodes and prepares the others in a thread
pool (Pillow, OpenCV and SIFT release the GIL), batches images of equal prepared size through the
backbone, and writes each result as soon as its batch finishes: a killed run loses at most the batch
in flight and the next run picks up where it stopped. A bad image is recorded (report, optional
JSONL log) and never stops the run.

:func:`iter_feature_maps` is the consumer side: it yields the FeatureMap of every path, in order,
extracting what is missing on the way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
from tqdm.auto import tqdm

from selret.errors import CacheError, ImageError
from selret.features import FeatureMap
from selret.features.cache import FeatureCache
from selret.features.io import prepare_image
from selret.features.keypoints import detect_keypoints
from selret.files import list_images

__all__ = [
    "DEFAULT_NUM_WORKERS",
    "ExtractionReport",
    "cache_id",
    "extract_to_cache",
    "iter_feature_maps",
    "list_images",
]

logger = logging.getLogger(__name__)

#: Decoding threads: enough to keep a CPU or GPU forward pass fed without starving it of cores.
DEFAULT_NUM_WORKERS = min(4, os.cpu_count() or 1)

# Decoded images waiting for a batch partner of the same size; beyond this many (times batch_size)
# the largest group is run even if incomplete, which bounds memory when sizes vary a lot.
_PENDING_BATCHES = 4


@dataclass
class ExtractionReport:
    """Outcome of one :func:`extract_to_cache` run.

    ``n_cached`` counts images skipped because their features were already cached (or that repeat an
    earlier path of the same run). ``failed`` lists ``(path, reason)`` of images that could not be
    used; ``reason`` starts with the error type. ``seconds`` is the wall-clock time of the run.
    """

    n_total: int = 0
    n_extracted: int = 0
    n_cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failed)

    def summary(self) -> str:
        rate = self.n_extracted / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.n_total} images: {self.n_extracted} extracted, {self.n_cached} already cached, "
            f"{self.n_failed} failed, in {self.seconds:.1f} s ({rate:.2f} images/s extracted)"
        )


def cache_id(backbone) -> str:
    """What the maps of ``backbone`` depend on, as used in cache keys: ``Backbone.id``, plus
    ``@<dtype>`` when the network runs below float32 (half-precision maps differ from fp32 ones)."""
    dtype = str(getattr(backbone, "dtype", "float32")).removeprefix("torch.")
    return backbone.id if dtype == "float32" else f"{backbone.id}@{dtype}"


# --------------------------------------------------------------------------- internals


@dataclass
class _Job:
    index: int
    path: Path
    bbox: Sequence[float] | None
    rotation: int
    key: str = ""


@dataclass
class _Prepared:
    job: _Job
    rgb: np.ndarray
    keypoints: np.ndarray


class _Failures:
    """Records failed images in the report, the optional JSONL log and the progress bar."""

    def __init__(self, report: ExtractionReport, log: IO[str] | None, bar: tqdm):
        self.report, self.log, self.bar = report, log, bar
        self.errors: dict[int, BaseException] = {}

    def add(self, job: _Job, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, ImageError) else str(exc)
        self.report.failed.append((str(job.path), f"{type(exc).__name__}: {reason}"))
        self.errors[job.index] = exc
        logger.debug("%s failed: %s: %s", job.path, type(exc).__name__, reason)
        if self.log is not None:
            record = {
                "path": str(job.path),
                "error": type(exc).__name__,
                "reason": reason,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        self.bar.update(1)
        self.bar.set_postfix(failed=self.report.n_failed, refresh=False)


def _per_image(values: Sequence | None, n: int, what: str, default=None) -> list:
    if values is None:
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} paths")
    return [default if v is None else v for v in values]


def _prepared_stream(
    jobs: list[_Job], prepare: Callable[[_Job], _Prepared], num_workers: int, prefetch: int
) -> Iterator[tuple[_Job, _Prepared | Exception]]:
    """``prepare(job)`` for every job, in order, computed up to ``prefetch`` jobs ahead in threads.

    Exceptions are returned, not raised: one bad image must not end the stream.
    """

    def attempt(job: _Job) -> _Prepared | Exception:
        try:
            return prepare(job)
        except Exception as exc:  # any decode failure, typed or not, belongs to that image
            return exc

    if num_workers <= 0:
        for job in jobs:
            yield job, attempt(job)
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix="selret-decode") as pool:
        queue: deque[tuple[_Job, Future]] = deque()
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


def _run(
    paths: Sequence[str | Path],
    backbone,
    cache: FeatureCache,
    max_side: int,
    batch_size: int,
    bboxes: Sequence | None,
    rotations: Sequence[int] | None,
    log_path: str | Path | None,
    num_workers: int,
    bar: tqdm,
) -> tuple[ExtractionReport, list[str | None], dict[int, BaseException]]:
    """Extract the missing maps of ``paths``; returns the report, each path's key (None when it
    failed) and the exception of each failed index."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    n = len(paths)
    jobs = [
        _Job(i, Path(p), bb, rot)
        for i, (p, bb, rot) in enumerate(
            zip(
                paths,
                _per_image(bboxes, n, "bboxes"),
                _per_image(rotations, n, "rotations", 0),
                strict=True,
            )
        )
    ]
    report = ExtractionReport(n_total=n)
    keys: list[str | None] = [None] * n
    config = cache_id(backbone)
    log = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")  # closed in the finally below
    failures = _Failures(report, log, bar)

    def fail(job: _Job, exc: BaseException) -> None:
        failures.add(job, exc)
        keys[job.index] = None

    try:
        todo: list[_Job] = []
        scheduled: set[str] = set()
        for job in jobs:
            try:
                job.key = cache.key(job.path, config, max_side, job.bbox, job.rotation)
            except ImageError as exc:
                fail(job, exc)
                continue
            keys[job.index] = job.key
            if job.key in scheduled or job.key in cache:
                report.n_cached += 1
                bar.update(1)
            else:
                scheduled.add(job.key)
                todo.append(job)

        def prepare(job: _Job) -> _Prepared:
            prepared = prepare_image(job.path, max_side, bbox=job.bbox, rotation=job.rotation)
            return _Prepared(job, prepared.rgb, detect_keypoints(prepared.rgb))

        def run_batch(items: list[_Prepared]) -> None:
            try:
                maps = backbone.forward_maps(np.stack([it.rgb for it in items]))
            except Exception as exc:
                if len(items) > 1:  # find out which image it was, or run them singly (e.g. OOM)
                    for it in items:
                        run_batch([it])
                    return
                fail(items[0].job, exc)
                return
            for it, fmap in zip(items, maps, strict=True):
                try:
                    cache.put(it.job.key, FeatureMap(fmap, it.rgb.shape[:2], it.keypoints))
                except OSError as exc:
                    # A full or read-only disk fails every image alike: stop, keeping what is done.
                    raise CacheError(
                        f"{cache.root}: cannot write cache entry for {it.job.path}: {exc}"
                    ) from exc
                report.n_extracted += 1
                bar.update(1)

        pending: dict[tuple[int, int], list[_Prepared]] = {}
        n_pending = 0
        stream = _prepared_stream(
            todo, prepare, num_workers, prefetch=max(2 * batch_size, 2 * num_workers)
        )
        # closing(): on Ctrl-C or an error, stop the decoding threads before leaving.
        with closing(stream):
            for job, result in stream:
                if isinstance(result, Exception):
                    fail(job, result)
                    continue
                group = pending.setdefault(result.rgb.shape[:2], [])
                group.append(result)
                n_pending += 1
                if len(group) == batch_size:
                    shape = result.rgb.shape[:2]
                elif n_pending > _PENDING_BATCHES * batch_size:
                    shape = max(pending, key=lambda s: len(pending[s]))
                else:
                    continue
                n_pending -= len(pending[shape])
                run_batch(pending.pop(shape))
        for shape in sorted(pending):
            run_batch(pending[shape])
    finally:
        if log is not None:
            log.close()
        report.seconds = time.perf_counter() - start
    return report, keys, failures.errors


def _progress_bar(total: int, progress: bool, desc: str) -> tqdm:
    return tqdm(total=total, disable=not progress, unit="img", desc=desc, dynamic_ncols=True)


# --------------------------------------------------------------------------- public API


def extract_to_cache(
    paths: Iterable[str | Path],
    backbone,
    cache: FeatureCache,
    max_side: int = 1024,
    batch_size: int = 8,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    rotations: Sequence[int | None] | None = None,
    progress: bool = True,
    log_path: str | Path | None = None,
    num_workers: int = DEFAULT_NUM_WORKERS,
) -> ExtractionReport:
    """Extract the conv maps (and SIFT keypoints) of ``paths`` into ``cache``, skipping cached ones.

    ``backbone`` is a :class:`selret.features.backbones.Backbone`. ``bboxes`` and ``rotations``, if given,
    align with ``paths`` (None entries: no crop / no rotation); see :func:`selret.features.io.prepare_image`.
    Images of equal prepared size are batched ``batch_size`` at a time. ``num_workers`` threads
    decode ahead of the network (0: decode in the calling thread). Failed images are listed in the
    report and, with ``log_path``, appended to that JSONL file as ``{"path", "error", "reason",
    "time"}``. Raises CacheError only if the cache cannot be written (finished entries are kept).
    """
    paths = list(paths)
    with _progress_bar(len(paths), progress, "extract") as bar:
        report, _, _ = _run(
            paths,
            backbone,
            cache,
            max_side,
            batch_size,
            bboxes,
            rotations,
            log_path,
            num_workers,
            bar,
        )
    return report


def iter_feature_maps(
    paths: Iterable[str | Path],
    backbone,
    cache: FeatureCache,
    max_side: int = 1024,
    batch_size: int = 8,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    rotations: Sequence[int | None] | None = None,
    progress: bool = False,
    log_path: str | Path | None = None,
    num_workers: int = DEFAULT_NUM_WORKERS,
    errors: Literal["skip", "raise"] = "skip",
    chunk_size: int = 256,
) -> Iterator[tuple[Path, FeatureMap]]:
    """Yield ``(path, FeatureMap)`` for every path, in order, extracting missing maps on the way.

    Works through ``paths`` ``chunk_size`` at a time (extract what is missing, then read the chunk
    back from the cache), so memory stays bounded and an interrupted run resumes. An image that
    cannot be used is skipped with a logged warning (``errors="skip"``) or raises its error
    (``errors="raise"``). Other arguments are those of :func:`extract_to_cache`.
    """
    if errors not in ("skip", "raise"):
        raise ValueError(f"errors must be 'skip' or 'raise', got {errors!r}")
    paths = [Path(p) for p in paths]
    n = len(paths)
    bboxes = _per_image(bboxes, n, "bboxes")
    rotations = _per_image(rotations, n, "rotations", 0)
    with _progress_bar(n, progress, "features") as bar:
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            _, keys, failed = _run(
                paths[lo:hi], backbone, cache, max_side, batch_size,
                bboxes[lo:hi], rotations[lo:hi], log_path, num_workers, bar,
            )  # fmt: skip
            for i, key in enumerate(keys):
                path = paths[lo + i]
                fmap = cache.get(key) if key is not None else None
                if fmap is None:
                    exc = failed.get(i) or CacheError(
                        f"{path}: no features in the cache after extraction"
                    )
                    if errors == "raise":
                        raise exc
                    logger.warning("skipping %s: %s: %s", path, type(exc).__name__, exc)
                    continue
                yield path, fmap
