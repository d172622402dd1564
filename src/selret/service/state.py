"""The state the HTTP service keeps around its one opened :class:`~selret.search.engine.SearchEngine`.

:class:`SearchService` runs a search in two stages:

1. **decode** (a bounded thread pool, many queries in parallel, outside any lock): read the query
   image (upload bytes, or an indexed file found by catalog id) under the query pixel cap, decode
   it (JPEGs at reduced size, draft mode), crop and resize it to the network input, SIFT keypoints
   when the encoder's mask needs them;
2. **batch** (one worker thread, :class:`~selret.service.batching.MicroBatcher`): the decoded
   queries that are ready together go through one backbone forward per input size (split so that
   no forward holds more than ``forward_max_pixels`` of input), one ``Encoder.encode_many`` and
   one index search per query-expansion setting.

The network and the encoder are only ever used by the batch worker, so they need no lock; the
index is thread-safe by itself. The service also keeps the statistics and an LRU cache of
thumbnails, rendered in the decode pool too, so that no request decodes outside its bound.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selret.errors import BoundingBoxError, ImageError, ImageNotFoundError, ImageTooSmallError
from selret.features.featuremap import FeatureMap
from selret.search.engine import SearchEngine
from selret.search.hits import SearchHit
from selret.service.batching import Admission, MicroBatcher
from selret.service.config import MAX_THUMBNAIL_SIDE, MIN_THUMBNAIL_SIDE, ServiceConfig

__all__ = [
    "MAX_THUMBNAIL_SIDE",
    "MIN_THUMBNAIL_SIDE",
    "THUMBNAIL_CACHE_ENTRIES",
    "THUMBNAIL_JPEG_QUALITY",
    "IndexedImageChangedError",
    "IndexedImageError",
    "IndexedImageGoneError",
    "NetworkError",
    "SearchService",
    "Thumbnail",
]

logger = logging.getLogger(__name__)

#: Thumbnails kept in memory (LRU), each at most ``MAX_THUMBNAIL_SIDE`` px on its longest side.
THUMBNAIL_CACHE_ENTRIES = 512
THUMBNAIL_JPEG_QUALITY = 85


class IndexedImageError(ImageError):
    """An indexed image's file can no longer be used as it was indexed."""

    hint = "re-index the folder (`selret index add`) so that the index matches the files"


class IndexedImageGoneError(IndexedImageError, ImageNotFoundError):
    """The file of an indexed image vanished (HTTP 404)."""


class IndexedImageChangedError(IndexedImageError):
    """The file of an indexed image changed on disk into something unusable (HTTP 409)."""


class NetworkError(ImageError):
    """The backbone failed on a query image (e.g. out of memory); the image may be fine."""


@dataclass(frozen=True)
class Thumbnail:
    """A JPEG thumbnail and the size of the image it shows (width, height, upright, in pixels)."""

    jpeg: bytes
    original_size: tuple[int, int]


@dataclass
class _Query:
    """A decoded query waiting for its batch."""

    rgb: np.ndarray
    keypoints: np.ndarray | None
    k: int
    query_expansion: int
    name: str


def _chain(source: Future, target: Future) -> None:
    """Copy the outcome of ``source`` into ``target`` unless the target was cancelled."""
    if source.cancelled():
        _chain_error(RuntimeError("the search was cancelled: the service is closing"), target)
    elif (exc := source.exception()) is not None:
        _chain_error(exc, target)
    elif not target.cancelled():
        try:
            target.set_result(source.result())
        except InvalidStateError:  # cancelled meanwhile (the client went away): nobody waits
            pass


def _chain_error(exc: BaseException, target: Future) -> None:
    if not target.cancelled():
        try:
            target.set_exception(exc)
        except InvalidStateError:
            pass


class SearchService:
    """One opened SearchEngine, its decode pool and batch worker, statistics and thumbnails."""

    def __init__(
        self,
        engine: SearchEngine,
        config: ServiceConfig | None = None,
        admission: Admission | None = None,
    ):
        self.engine = engine
        self.config = config or ServiceConfig()
        self.admission = admission or Admission(self.config.max_queue)
        self.thumbnail_size = self.config.thumbnail_size
        self.started_at = time.monotonic()
        self.extractor = engine.extractor()
        # Extractor.forward runs chunks of its batch_size: one chunk must hold a whole group.
        self.extractor.batch_size = max(self.extractor.batch_size, self.config.batch_size)
        self._lock = threading.Lock()
        self._decoding = 0
        self._searches = 0
        self._search_seconds = 0.0
        self._thumbnails: OrderedDict[tuple[int, int], Thumbnail] = OrderedDict()
        self._pool = ThreadPoolExecutor(self.config.decode_workers, "selret-decode")
        self._batcher: MicroBatcher[_Query, list[SearchHit]] = MicroBatcher(
            self._run_batch,
            self.config.batch_size,
            self.config.batch_wait_ms / 1000,
            more_coming=lambda: self._decoding,
        )

    def warm_up(self) -> None:
        """Load the backbone now, so that the first query does not pay for it."""
        _ = self.extractor.backbone

    def close(self) -> None:
        """Stop the batch worker and the decode pool (queued work is cancelled)."""
        self._batcher.close(timeout=60)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def record(self, image_id: int):
        """The catalog record of ``image_id``; KeyError if it is not indexed."""
        return self.engine.index.get(int(image_id))

    # ------------------------------------------------------------------ searching

    def submit_search(
        self,
        source: bytes | int,
        k: int,
        bbox: Sequence[float] | None,
        query_expansion: int,
        name: str,
    ) -> Future[list[SearchHit]]:
        """Top-``k`` hits for image bytes or the indexed image of catalog id ``source``, later.

        The future raises ImageError for an unusable image or box, KeyError for an unknown id.
        """
        out: Future[list[SearchHit]] = Future()
        with self._lock:
            self._decoding += 1
        try:
            decoded = self._pool.submit(self._decode, source, k, bbox, query_expansion, name)
        except BaseException:
            with self._lock:
                self._decoding -= 1
            raise

        def decoded_done(f: Future) -> None:
            try:
                if f.cancelled() or f.exception() is not None or out.cancelled():
                    _chain(f, out)
                    return
                # Queued before _decoding drops, so the batcher never misses a coming query.
                try:
                    batched = self._batcher.submit(f.result())
                except RuntimeError as exc:  # the service is closing
                    _chain_error(exc, out)
                    return
                batched.add_done_callback(lambda b: _chain(b, out))
            finally:
                with self._lock:
                    self._decoding -= 1

        decoded.add_done_callback(decoded_done)
        return out

    def search(self, source, k, bbox, query_expansion, name) -> list[SearchHit]:
        """:meth:`submit_search`, waited for."""
        return self.submit_search(source, k, bbox, query_expansion, name).result()

    def _decode(self, source, k, bbox, query_expansion, name) -> _Query:
        if isinstance(source, int):
            record = self.record(source)  # the path comes from the catalog, never the client
            label = f"indexed image {source} ({Path(record.path).name})"
            try:
                # An indexed file passed the indexing pixel cap already: it is not held to the
                # (lower) query cap, which would make some indexed images unsearchable by id.
                prepared = self.extractor.prepare(
                    record.path, bbox=bbox, name=label, draft=self.config.draft
                )
            except ImageError as exc:
                if bbox is not None and isinstance(exc, (BoundingBoxError, ImageTooSmallError)):
                    raise  # the client's box does not fit the image: the client's error
                raise _indexed_error(exc, label) from None
        else:
            prepared = self.extractor.prepare(
                source,
                bbox=bbox,
                name=name,
                max_pixels=self.config.query_max_pixels,
                draft=self.config.draft,
            )
        keypoints = None
        if self.extractor.keypoints:
            from selret.features.keypoints import detect_keypoints

            keypoints = detect_keypoints(prepared.rgb)
        return _Query(prepared.rgb, keypoints, k, query_expansion, name)

    def _run_batch(self, queries: list[_Query]) -> list[list[SearchHit] | BaseException]:
        """One group: a forward per input size, one encode, one index search per QE setting."""
        start = time.perf_counter()
        results: list[list[SearchHit] | BaseException | None] = [None] * len(queries)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            by_size[q.rgb.shape[:2]].append(i)
        maps: dict[int, FeatureMap] = {}
        for size, members in by_size.items():
            # A forward's activations grow with its input pixels: bound them per forward.
            per_forward = max(1, self.config.forward_max_pixels // (size[0] * size[1]))
            for lo in range(0, len(members), per_forward):
                part = members[lo : lo + per_forward]
                outputs = self.extractor.forward([queries[i].rgb for i in part])
                for i, out in zip(part, outputs, strict=True):
                    if isinstance(out, Exception):
                        logger.warning("backbone failed on %s: %s", queries[i].name, out)
                        results[i] = NetworkError(queries[i].name, f"the network failed: {out}")
                    else:
                        maps[i] = FeatureMap(out, size, queries[i].keypoints)
        done = sorted(maps)
        if done:
            # batch_size=1: a query's scores must not depend on which queries shared its group
            # (a stacked product rounds differently; on an encoder learned from few images that
            # shows at 1e-4). Encoding is a few ms against seconds of forward, so it costs nothing.
            vectors = self.engine.encoder.encode_many([maps[i] for i in done], batch_size=1)
            row_of = {i: row for row, i in enumerate(done)}
            by_expansion: dict[int, list[int]] = defaultdict(list)
            for i in done:
                by_expansion[queries[i].query_expansion].append(i)
            for expansion, members in by_expansion.items():
                # Top-k of the largest k, cut per query: exact top-k rows do not depend on k.
                k = max(queries[i].k for i in members)
                rows = vectors[[row_of[i] for i in members]]
                hits = self.engine.index.search(rows, k, query_expansion=expansion)
                for i, found in zip(members, hits, strict=True):
                    results[i] = found[: queries[i].k]
        self.admission.record(time.perf_counter() - start, len(queries))
        return results  # type: ignore[return-value]  # every slot was filled above

    def count_search(self, seconds: float) -> None:
        with self._lock:
            self._searches += 1
            self._search_seconds += seconds

    # ------------------------------------------------------------------ statistics

    def stats(self) -> dict:
        info = self.engine.index.info()
        config = self.engine.encoder.config.to_dict()
        # A weights file path would reveal the server's layout; its name is enough.
        config["weights"] = Path(str(config["weights"])).name
        with self._lock:
            searches, seconds = self._searches, self._search_seconds
        batcher = self._batcher
        return {
            "count": info["count"],
            "dim": info["dim"],
            "kind": info["kind"],
            "index_kind": info["index_kind"],
            "encoder": repr(self.engine.encoder),
            "encoder_config": config,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "searches": searches,
            "mean_latency_ms": round(1000 * seconds / searches, 3) if searches else None,
            "batches": batcher.batches,
            "batched_queries": batcher.items,
            "mean_batch_size": round(batcher.items / batcher.batches, 3)
            if batcher.batches
            else None,
            "largest_batch": batcher.largest,
            "in_progress": self.admission.in_progress,
            "refused_busy": self.admission.rejected,
            "limits": {
                "batch_size": self.config.batch_size,
                "batch_wait_ms": self.config.batch_wait_ms,
                "forward_max_pixels": self.config.forward_max_pixels,
                "max_queue": self.config.max_queue,
                "query_max_pixels": self.config.query_max_pixels,
                "max_upload_bytes": self.config.max_upload_bytes,
            },
        }

    # ------------------------------------------------------------------ thumbnails

    def submit_thumbnail(self, image_id: int, size: int) -> Future[Thumbnail]:
        """JPEG of an indexed image, longest side at most ``size``: from the cache, or rendered in
        the decode pool. The future raises KeyError (unknown id) or IndexedImageError."""
        key = (int(image_id), int(size))
        with self._lock:
            cached = self._thumbnails.get(key)
            if cached is not None:
                self._thumbnails.move_to_end(key)
        if cached is not None:
            done: Future[Thumbnail] = Future()
            done.set_result(cached)
            return done
        return self._pool.submit(self._render_thumbnail, *key)

    def thumbnail(self, image_id: int, size: int) -> Thumbnail:
        """:meth:`submit_thumbnail`, waited for."""
        return self.submit_thumbnail(image_id, size).result()

    def _render_thumbnail(self, image_id: int, size: int) -> Thumbnail:
        from PIL import Image

        from selret.features.io import image_size, load_image, resize_longest

        record = self.record(image_id)
        label = f"indexed image {image_id} ({Path(record.path).name})"
        try:
            # Draft: a JPEG decodes at the smallest libjpeg scale that still covers the size.
            draft = (size, size) if self.config.draft else None
            rgb = load_image(record.path, name=label, draft_size=draft)
            # The upright original's size, the frame of a search box: the catalog's, as in search
            # results (a draft decode is smaller, and reading the header again may mean decoding
            # a PNG again, whose EXIF can follow the pixels).
            height, width = record.height, record.width
            if height is None or width is None:
                height, width = image_size(record.path, name=label)
        except ImageError as exc:
            raise _indexed_error(exc, label) from None
        if max(height, width) > size:
            rgb, _ = resize_longest(rgb, size)
        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
        thumb = Thumbnail(out.getvalue(), (width, height))
        with self._lock:
            self._thumbnails[(image_id, size)] = thumb
            while len(self._thumbnails) > THUMBNAIL_CACHE_ENTRIES:
                self._thumbnails.popitem(last=False)
        return thumb


def _indexed_error(exc: ImageError, label: str) -> IndexedImageError:
    """The error of an indexed file that no longer decodes as it did when it was indexed."""
    if isinstance(exc, ImageNotFoundError):
        return IndexedImageGoneError(label, f"the file is gone: {exc.reason}")
    return IndexedImageChangedError(label, f"the file changed on disk: {exc.reason}")
