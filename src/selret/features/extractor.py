"""The one front door from images to conv feature maps: :class:`Extractor`.

An ``Extractor`` holds what a map depends on (weights, layer, image size policy) and the machinery
around the network: the backbone (loaded once, lazily), SIFT keypoints, the feature cache and its
keys, threaded decoding ahead of the network, and batching that splits a failed batch to find the
image at fault. The CLI, the encoder's image front end, the search engine, the server and the Ray
pipeline all go through it, so an image gives the same map whichever door it came in by.

Batch extraction (:meth:`Extractor.extract`) skips images already cached, writes each result as soon
as its batch finishes (a killed run loses at most the batch in flight), and records a bad image
(report, optional JSONL log) without stopping. A corrupt cache entry counts as missing and is
extracted again. Images whose data is damaged (see :mod:`selret.features.io`) are refused unless
the extractor was made with ``strict=False``; then they are extracted and listed as damaged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from selret.errors import CacheError, CorruptImageError
from selret.features.cache import FeatureCache
from selret.features.featuremap import FeatureMap
from selret.features.io import DEFAULT_MAX_PIXELS, PreparedImage, image_size, prepare_image
from selret.features.keypoints import detect_keypoints
from selret.features.streaming import (
    DECODE_ERRORS,
    ExtractionReport,
    Failures,
    per_image,
    prepared_stream,
    progress_bar,
)  # fmt: skip
from selret.files import crash_point, default_cache_dir

__all__ = [
    "DEFAULT_NUM_WORKERS", "ExtractionReport", "Extractor", "FeatureMaps", "cache_id",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: Decoding threads: enough to keep a CPU or GPU forward pass fed without starving it of cores.
DEFAULT_NUM_WORKERS = min(4, os.cpu_count() or 1)

# Decoded images waiting for a batch partner of the same size; beyond this many (times batch_size)
# the largest group is run even if incomplete, which bounds memory when sizes vary a lot.
_PENDING_BATCHES = 4


def cache_id(backbone) -> str:
    """What the maps of ``backbone`` depend on, as used in cache keys: ``Backbone.id``, plus
    ``@<dtype>`` when the network runs below float32 (half-precision maps differ from fp32 ones)."""
    dtype = str(getattr(backbone, "dtype", "float32")).removeprefix("torch.")
    return backbone.id if dtype == "float32" else f"{backbone.id}@{dtype}"


@dataclass
class _Job:
    index: int
    path: Path
    bbox: Sequence[float] | None
    rotation: int
    key: str = ""


class Extractor:
    """Images -> :class:`FeatureMap` records, with the backbone, keypoints and cache in one place.

    ``max_side`` is the network input's longest side. With ``upscale=False`` an image smaller than
    that keeps its own size (a 640-px photo is not blown up to 1024), and its cache entry is the
    one of its own size. ``cache`` is a :class:`FeatureCache` or its folder (default:
    ``$SELRET_CACHE`` or ``~/.cache/selret/features``). ``keypoints=False`` skips SIFT detection
    in :meth:`feature_map` (for encoders that never use the SIFT-mask; cached entries always carry
    keypoints).
    ``draft=True`` decodes JPEGs at a reduced scale that still holds the network input
    (:func:`~selret.features.io.prepare_image`); its cache entries are kept apart from those of full
    decodes. ``strict=False`` accepts images whose data is damaged (listed in the report, logged,
    and marked in their cache entries); by default they fail like undecodable ones.
    ``backbone`` may be passed in (already loaded); otherwise it is loaded on first use.
    """

    def __init__(
        self,
        weights: str = "vgg16-caffe",
        layer: str = "pool5",
        max_side: int = 1024,
        *,
        upscale: bool = True,
        cache: FeatureCache | str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        num_workers: int = DEFAULT_NUM_WORKERS,
        keypoints: bool = True,
        draft: bool = False,
        strict: bool = True,
        backbone=None,
    ):
        self.weights = weights
        self.layer = layer
        self.max_side = int(max_side)
        self.upscale = upscale
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(
            Path(cache).expanduser() if cache else default_cache_dir()
        )  # fmt: skip
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.keypoints = keypoints
        self.draft = draft
        self.strict = strict
        self._backbone = backbone
        if backbone is not None and (
            getattr(backbone, "weights", weights),
            getattr(backbone, "layer", layer),
        ) != (weights, layer):
            raise ValueError(f"backbone {backbone.id} is not {weights}:{layer}")

    @classmethod
    def for_config(cls, config, **kwargs) -> Extractor:
        """The extractor of an encoder config (anything with ``weights``, ``layer``, ``max_side``)."""
        return cls(config.weights, config.layer, config.max_side, **kwargs)

    def __repr__(self) -> str:
        up = "" if self.upscale else ", upscale=False"
        up += ", draft=True" if self.draft else ""
        up += "" if self.strict else ", strict=False"
        return (
            f"Extractor({self.weights!r}, {self.layer!r}, {self.max_side}{up}, cache={self.cache})"
        )

    # ------------------------------------------------------------------ network

    @property
    def backbone(self):
        """The :class:`~selret.features.backbones.Backbone`, loaded on first use."""
        if self._backbone is None:
            from selret.features.backbones import load_backbone

            self._backbone = load_backbone(
                self.weights, self.layer, device=self.device, dtype=self.dtype
            )
        return self._backbone

    @property
    def cache_id(self) -> str:
        return cache_id(self.backbone)

    def forward(self, rgbs: Sequence[np.ndarray]) -> list[np.ndarray | RuntimeError]:
        """Conv maps of equal-size uint8 RGB images, one forward pass per ``batch_size``.

        A batch that fails (out of memory, a bad input) is split and run image by image, so one
        image cannot take its batch partners down; an image that fails alone gets its error in its
        place in the result.
        """
        out: list[np.ndarray | RuntimeError] = []
        for lo in range(0, len(rgbs), self.batch_size):
            out.extend(self._forward_split(list(rgbs[lo : lo + self.batch_size])))
        return out

    def _forward_split(self, rgbs: list[np.ndarray]) -> list[np.ndarray | RuntimeError]:
        try:
            return list(self.backbone.forward_maps(np.stack(rgbs)))
        except RuntimeError as exc:  # torch's errors (OOM included) are RuntimeErrors
            if len(rgbs) == 1:
                return [exc]
            return [r for rgb in rgbs for r in self._forward_split([rgb])]

    # ------------------------------------------------------------------ one image

    def side_for(self, source, name: str | None = None) -> int:
        """The network-input longest side for ``source`` (``max_side``, or less without upscaling;
        a rotation by 90 degrees keeps the longest side, so it does not enter)."""
        if self.upscale:
            return self.max_side
        return min(self.max_side, max(image_size(source, name=name)))

    def prepare(
        self,
        source,
        bbox=None,
        rotation: int = 0,
        name: str | None = None,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        draft: bool | None = None,
        strict: bool | None = None,
    ) -> PreparedImage:
        """The network-input image of ``source`` (a path or bytes), as this extractor sizes it.

        ``max_pixels`` caps the pixels decoded (None: Pillow's own limit only); ``draft`` and
        ``strict`` default to the extractor's (see :func:`~selret.features.io.prepare_image`).
        """
        side = self.side_for(source, name)
        return prepare_image(
            source, max_side=side, bbox=bbox, rotation=rotation, name=name, max_pixels=max_pixels,
            draft=self.draft if draft is None else draft,
            strict=self.strict if strict is None else strict,
        )  # fmt: skip

    def feature_map(
        self,
        source,
        bbox=None,
        rotation: int = 0,
        name: str | None = None,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        draft: bool | None = None,
        strict: bool | None = None,
    ) -> FeatureMap:
        """The map of one image path or its bytes, computed now (the cache is not consulted).
        Options as in :meth:`prepare`."""
        prepared = self.prepare(
            source, bbox, rotation, name, max_pixels=max_pixels, draft=draft, strict=strict
        )
        result = self.forward([prepared.rgb])[0]
        if isinstance(result, Exception):
            raise result
        keypoints = detect_keypoints(prepared.rgb) if self.keypoints else None
        return FeatureMap(result, prepared.size, keypoints)

    def key(self, path, bbox=None, rotation: int = 0) -> str:
        """The cache key of image file ``path`` (its content, crop, rotation and this config)."""
        side = self.side_for(path)
        return self.cache.key(
            path, self.cache_id, side, bbox=bbox, rotation=rotation, draft=self.draft
        )

    # ------------------------------------------------------------------ many images

    def extract(
        self,
        paths: Iterable[str | Path],
        bboxes: Sequence | None = None,
        rotations: Sequence | None = None,
        progress: bool = True,
        log_path: str | Path | None = None,
    ) -> ExtractionReport:
        """Extract the maps (and SIFT keypoints) of ``paths`` into the cache, skipping cached ones.

        ``bboxes`` and ``rotations``, if given, align with ``paths`` (None entries: no crop / no
        rotation). Failed images are listed in the report and, with ``log_path``, appended to that
        JSONL file as ``{"path", "error", "reason", "time"}``. Raises CacheError only if the cache
        cannot be written (finished entries are kept).
        """
        paths = list(paths)
        with progress_bar(len(paths), progress, "extract") as bar:
            report, _, _ = self._run(paths, bboxes, rotations, log_path, bar)
        return report

    def maps(
        self,
        paths: Sequence[str | Path],
        bboxes: Sequence | None = None,
        rotations: Sequence | None = None,
        progress: bool = True,
        log_path: str | Path | None = None,
    ) -> FeatureMaps:
        """The maps of ``paths`` as a lazy :class:`FeatureMaps` (missing ones extracted first)."""
        paths = [Path(p) for p in paths]
        with progress_bar(len(paths), progress, "extract") as bar:
            report, keys, _ = self._run(paths, bboxes, rotations, log_path, bar)
        return FeatureMaps(self.cache, paths, keys, report)

    def iter_maps(
        self,
        paths: Iterable[str | Path],
        bboxes: Sequence | None = None,
        rotations: Sequence | None = None,
        progress: bool = False,
        log_path: str | Path | None = None,
        errors: Literal["skip", "raise"] = "skip",
        chunk_size: int = 256,
    ) -> Iterator[tuple[Path, FeatureMap]]:
        """Yield ``(path, FeatureMap)`` for every path, in order, extracting missing maps on the way.

        Works ``chunk_size`` paths at a time, so memory stays bounded and an interrupted run
        resumes. An unusable image is skipped with a logged warning (``errors="skip"``) or raises
        its error (``errors="raise"``).
        """
        if errors not in ("skip", "raise"):
            raise ValueError(f"errors must be 'skip' or 'raise', got {errors!r}")
        paths = [Path(p) for p in paths]
        n = len(paths)
        bboxes = per_image(bboxes, n, "bboxes")
        rotations = per_image(rotations, n, "rotations", 0)
        with progress_bar(n, progress, "features") as bar:
            for lo in range(0, n, chunk_size):
                hi = min(lo + chunk_size, n)
                _, keys, failed = self._run(
                    paths[lo:hi], bboxes[lo:hi], rotations[lo:hi], log_path, bar
                )
                for i, key in enumerate(keys):
                    fmap = self.cache.get(key) if key is not None else None
                    if fmap is None:
                        exc = failed.get(i) or CacheError(
                            f"{paths[lo + i]}: no features in the cache after extraction"
                        )
                        if errors == "raise":
                            raise exc
                        logger.warning(
                            "skipping %s: %s: %s", paths[lo + i], type(exc).__name__, exc
                        )
                        continue
                    yield paths[lo + i], fmap

    # ------------------------------------------------------------------ internals

    def _run(self, paths, bboxes, rotations, log_path, bar):
        """Extract the missing maps of ``paths``; returns the report, each path's key (None when it
        failed) and the exception of each failed index."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        start = time.perf_counter()
        n = len(paths)
        jobs = [
            _Job(i, Path(p), bb, rot)
            for i, (p, bb, rot) in enumerate(
                zip(paths, per_image(bboxes, n, "bboxes"),
                    per_image(rotations, n, "rotations", 0), strict=True)
            )
        ]  # fmt: skip
        report = ExtractionReport(n_total=n)
        keys: list[str | None] = [None] * n
        log = None
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "a", encoding="utf-8")  # closed in the finally below
        failures = Failures(report, log, bar)

        # Later jobs with the content of a job being extracted share its fate (key): they are
        # settled when it is, failed with its error or counted as cached once its map is written.
        followers: dict[str, list[_Job]] = {}

        def fail(job: _Job, exc: BaseException) -> None:
            for each in [job, *followers.pop(job.key, [])]:
                failures.add(each, exc)
                keys[each.index] = None

        def done(job: _Job, damage: str | None, extracted: bool) -> None:
            """``job``'s map is in the cache (``extracted`` now, or found there)."""
            for each in [job, *followers.pop(job.key, [])]:
                if damage is not None:
                    failures.damaged(each, damage)
                if extracted and each is job:
                    report.n_extracted += 1
                else:
                    report.n_cached += 1
                bar.update(1)

        try:
            todo: list[_Job] = []
            scheduled: set[str] = set()
            for job in jobs:
                try:
                    job.key = self.key(job.path, job.bbox, job.rotation)
                except DECODE_ERRORS as exc:
                    fail(job, exc)
                    continue
                keys[job.index] = job.key
                if job.key in scheduled:
                    followers.setdefault(job.key, []).append(job)
                    continue
                # A readable entry counts as done; a corrupt one is extracted again (get() logs it).
                entry = self.cache.get_entry(job.key)
                if entry is None:
                    scheduled.add(job.key)
                    todo.append(job)
                elif entry[1] is not None and self.strict:
                    # Made by a run that accepted damaged data: a strict run refuses the image.
                    reason = (
                        f"damaged image data: {entry[1]} (map cached by a run that accepted it)"
                    )
                    fail(job, CorruptImageError(job.path, reason))
                else:
                    done(job, entry[1], extracted=False)

            def prepare(job: _Job):
                prepared = self.prepare(job.path, bbox=job.bbox, rotation=job.rotation)
                # Cache entries always carry keypoints: any later encoder may use the SIFT-mask.
                return prepared.rgb, detect_keypoints(prepared.rgb), prepared.damage

            def run_batch(items: list) -> None:
                results = self.forward([rgb for _, (rgb, _, _) in items])
                for (job, (rgb, kps, damage)), result in zip(items, results, strict=True):
                    if isinstance(result, Exception):
                        fail(job, result)
                        continue
                    try:
                        self.cache.put(job.key, FeatureMap(result, rgb.shape[:2], kps), damage)
                    except OSError as exc:
                        # A full or read-only disk fails every image alike: stop, keeping the rest.
                        raise CacheError(
                            f"{self.cache.root}: cannot write cache entry for {job.path}: {exc}"
                        ) from exc
                    crash_point("extract.after_write")
                    done(job, damage, extracted=True)
                crash_point("extract.between_batches")

            pending: dict[tuple[int, int], list] = {}
            n_pending = 0
            prefetch = max(2 * self.batch_size, 2 * self.num_workers)
            stream = prepared_stream(todo, prepare, self.num_workers, prefetch)
            # closing(): on Ctrl-C or an error, stop the decoding threads before leaving.
            with closing(stream):
                for job, result in stream:
                    if isinstance(result, BaseException):
                        fail(job, result)
                        continue
                    shape = result[0].shape[:2]
                    group = pending.setdefault(shape, [])
                    group.append((job, result))
                    n_pending += 1
                    if len(group) < self.batch_size:
                        if n_pending <= _PENDING_BATCHES * self.batch_size:
                            continue
                        shape = max(pending, key=lambda s: len(pending[s]))
                    n_pending -= len(pending[shape])
                    run_batch(pending.pop(shape))
            for shape in sorted(pending):
                run_batch(pending[shape])
        finally:
            if log is not None:
                log.close()
            report.seconds = time.perf_counter() - start
        return report, keys, failures.errors


class FeatureMaps(Sequence[FeatureMap]):
    """The conv maps of a list of images as a lazy sequence backed by the feature cache.

    Made by :meth:`Extractor.maps`. Images that failed are dropped and listed in ``report``;
    ``paths`` holds the ones that succeeded, aligned with the sequence; ``indices`` their positions
    in the input list. An image that did not fail must have its map: a missing one is a
    CacheError, never a silently shorter list.
    """

    def __init__(self, cache: FeatureCache, paths, keys, report: ExtractionReport):
        self.cache = cache
        self.report = report
        failed = {str(p) for p, _ in report.failed}
        self.paths: list[Path] = []
        self.indices: list[int] = []
        self._keys: list[str] = []
        for i, (p, key) in enumerate(zip(paths, keys, strict=True)):
            if str(p) in failed:
                continue
            # _run has read every entry it counted as cached (a corrupt one was re-extracted), so
            # the file's presence is enough here; reading each map again would double the I/O.
            if key is None or key not in self.cache:
                raise CacheError(f"{p}: feature map missing from the cache {cache.root}")
            self.paths.append(Path(p))
            self.indices.append(i)
            self._keys.append(key)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        fmap = self.cache.get(self._keys[i])
        if fmap is None:
            raise CacheError(
                f"{self.paths[i]}: feature map missing from the cache {self.cache.root}"
            )
        return fmap
