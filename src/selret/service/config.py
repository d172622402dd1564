"""The settings of the HTTP service: :class:`ServiceConfig` (limits, timeouts, batching, access).

One frozen record, made once by ``selret serve`` (or a test) and read by the app, the request
guard, the search pipeline and the uvicorn server, so that each limit has one name and one default.
Every limit exists to bound what one client can cost the others: pixels decoded per query, bytes
and seconds per upload, searches waiting, open connections.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_QUERY_MAX_PIXELS",
    "MAX_THUMBNAIL_SIDE",
    "MIN_THUMBNAIL_SIDE",
    "ServiceConfig",
    "key_file_is_shared",
    "read_api_key",
]

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024

#: Pixel cap of a query image (width x height, from the header, before decoding): a quarter of
#: the indexing cap (64 MP), since a query is decoded while other clients wait. 16 MP is a
#: 4900 x 3265 photo, larger than any phone camera's default output.
DEFAULT_QUERY_MAX_PIXELS = 16_000_000

#: Bounds of a thumbnail's longest side (GET /images/{id}?size=).
MIN_THUMBNAIL_SIDE, MAX_THUMBNAIL_SIDE = 32, 1024

#: The environment variable ``selret serve`` reads the API key from.
API_KEY_ENV = "SELRET_API_KEY"

# Shortest key accepted: a key a person can guess or brute-force over HTTP protects nothing.
_MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class ServiceConfig:
    """Limits, timeouts, batching and access settings of one service (see the field comments).

    Construct with keywords; invalid values raise ValueError naming the field.
    """

    # ---- per request
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # largest query image, in bytes
    query_max_pixels: int = DEFAULT_QUERY_MAX_PIXELS  # width x height of a query image
    draft: bool = True  # decode JPEG queries at reduced size (memory ~ network input)
    thumbnail_size: int = 256  # default longest side of GET /images/{id}
    # ---- batching and queueing
    batch_size: int = 8  # most queries per backbone forward / encode / index search (1: serial)
    batch_wait_ms: float = 5.0  # longest wait for partners once a query is ready
    # Input pixels per backbone forward (a batch of large images is split): bounds the memory of
    # the activations, about 0.5 GB per 1024 x 768 image in float32 on CPU. 2 MP: two such
    # images, or a whole batch of small ones, where batching saves the most.
    forward_max_pixels: int = 2_000_000
    max_queue: int = 64  # searches admitted at once (decoding, waiting, running); more: 503
    decode_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    # ---- connections
    body_timeout_s: float = 30.0  # a POST body must arrive within this (slow uploads: 408)
    header_timeout_s: float = 10.0  # a request head must arrive within this (slow-loris)
    keep_alive_s: int = 5  # idle keep-alive connections are closed after this
    max_connections: int = 256  # open connections + requests in progress; more: 503
    # ---- access
    api_key: str | None = field(default=None, repr=False)  # None: no authentication
    cors_origins: tuple[str, ...] = ()  # origins allowed to call the API from a browser

    def __post_init__(self) -> None:
        positive_ints = (
            "max_upload_bytes", "query_max_pixels", "batch_size", "forward_max_pixels", "max_queue",
            "decode_workers",
            "keep_alive_s", "max_connections",
        )  # fmt: skip
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("body_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not (math.isfinite(self.batch_wait_ms) and 0 <= self.batch_wait_ms <= 1000):
            raise ValueError(f"batch_wait_ms must be in 0..1000, got {self.batch_wait_ms!r}")
        if not MIN_THUMBNAIL_SIDE <= self.thumbnail_size <= MAX_THUMBNAIL_SIDE:
            raise ValueError(
                f"thumbnail_size must be in {MIN_THUMBNAIL_SIDE}..{MAX_THUMBNAIL_SIDE}, "
                f"got {self.thumbnail_size}"
            )
        if self.api_key is not None and len(self.api_key) < _MIN_KEY_LENGTH:
            raise ValueError(f"the API key must have at least {_MIN_KEY_LENGTH} characters")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"a CORS origin is '*' or starts with http(s)://, got {origin!r}")

    def replace(self, **changes) -> ServiceConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def key_file_is_shared(key_file: str | Path) -> bool:
    """Whether users other than the owner may read ``key_file`` (and so search with its key)."""
    return bool(Path(key_file).stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))


def read_api_key(key_file: str | Path | None = None, environ=os.environ) -> str | None:
    """The API key from ``key_file`` (its first line) or else ``$SELRET_API_KEY``; None if neither.

    Raises ValueError for an empty or unreadable key file.
    """
    if key_file is not None:
        path = Path(key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the API key file: {exc}") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ValueError(f"{path}: the API key file is empty")
        return key
    key = environ.get(API_KEY_ENV, "").strip()
    return key or None
