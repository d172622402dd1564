"""The state the HTTP service keeps around its one opened :class:`~selret.search.engine.SearchEngine`.

:class:`SearchService` is shared by every request. Encoding a query (decode + CNN + encoder) runs
under one lock, so the network and the encoder are never used by two threads at once; the index
is thread-safe by itself. It also keeps the search statistics and an LRU cache of thumbnails.
"""

from __future__ import annotations

import functools
import io
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from selret.search.engine import SearchEngine
from selret.search.hits import SearchHit

__all__ = [
    "MAX_THUMBNAIL_SIDE",
    "MIN_THUMBNAIL_SIDE",
    "THUMBNAIL_CACHE_ENTRIES",
    "THUMBNAIL_JPEG_QUALITY",
    "SearchService",
    "Thumbnail",
]

#: Thumbnails kept in memory (LRU), each at most ``MAX_THUMBNAIL_SIDE`` px on its longest side.
THUMBNAIL_CACHE_ENTRIES = 512
MIN_THUMBNAIL_SIDE, MAX_THUMBNAIL_SIDE = 32, 1024
THUMBNAIL_JPEG_QUALITY = 85


@dataclass(frozen=True)
class Thumbnail:
    """A JPEG thumbnail and the size of the image it shows (width, height, upright, in pixels)."""

    jpeg: bytes
    original_size: tuple[int, int]


class SearchService:
    """One opened SearchEngine and the state the HTTP layer needs around it (thread-safe)."""

    def __init__(self, engine: SearchEngine, thumbnail_size: int = 256):
        self.engine = engine
        self.thumbnail_size = thumbnail_size
        self.started_at = time.monotonic()
        self._encode_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._searches = 0
        self._search_seconds = 0.0
        self.thumbnail = functools.lru_cache(maxsize=THUMBNAIL_CACHE_ENTRIES)(
            self._render_thumbnail
        )

    def warm_up(self) -> None:
        """Load the backbone now, so that the first query does not pay for it."""
        with self._encode_lock:
            _ = self.engine.extractor().backbone  # loads the network

    def record(self, image_id: int):
        """The catalog record of ``image_id``; KeyError if it is not indexed."""
        return self.engine.index.get(int(image_id))

    def search(
        self,
        source: bytes | int,
        k: int,
        bbox: Sequence[float] | None,
        query_expansion: int,
        name: str,
    ) -> list[SearchHit]:
        """Top-``k`` hits for image bytes, or for the indexed image of catalog id ``source``.

        Raises ImageError for an unusable image or box, KeyError for an unknown id.
        """
        if isinstance(source, int):
            # The path comes from the catalog, never from the client.
            source = self.record(source).path
        with self._encode_lock:
            vector = self.engine.encoder.encode(
                self.engine.extractor().feature_map(source, bbox=bbox, name=name)
            )
        return self.engine.search_vector(vector, k, query_expansion)

    def count_search(self, seconds: float) -> None:
        with self._stats_lock:
            self._searches += 1
            self._search_seconds += seconds

    def stats(self) -> dict:
        info = self.engine.index.info()
        config = self.engine.encoder.config.to_dict()
        # A weights file path would reveal the server's layout; its name is enough.
        config["weights"] = Path(str(config["weights"])).name
        with self._stats_lock:
            searches, seconds = self._searches, self._search_seconds
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
        }

    def _render_thumbnail(self, image_id: int, size: int) -> Thumbnail:
        """JPEG of an indexed image, longest side at most ``size`` (cached by ``thumbnail``)."""
        from PIL import Image

        from selret.features.io import load_image, resize_longest

        record = self.record(image_id)
        rgb = load_image(record.path, name=Path(record.path).name)
        height, width = rgb.shape[:2]
        if max(height, width) > size:
            rgb, _ = resize_longest(rgb, size)
        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
        return Thumbnail(out.getvalue(), (width, height))
