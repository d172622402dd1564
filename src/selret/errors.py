"""Typed errors. Every error about a file names the file and the reason."""

from __future__ import annotations

from pathlib import Path


class SelretError(Exception):
    """Base class of every error selret raises on purpose."""


class ImageError(SelretError):
    """An image could not be used. ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = str(path) if path is not None else "<bytes>"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageNotFoundError(ImageError):
    """The file does not exist or is not a regular file."""


class EmptyImageError(ImageError):
    """The file has zero bytes."""


class CorruptImageError(ImageError):
    """The bytes are not a decodable image (not an image, truncated, unsupported)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (decompression-bomb guard)."""


class ImageTooSmallError(ImageError):
    """The image is too small to give a conv feature map."""


class BoundingBoxError(ImageError):
    """A query bounding box is malformed or outside the image."""


class WeightsError(SelretError):
    """Backbone weights are missing, corrupt or do not fit the network."""


class CacheError(SelretError):
    """A feature-cache entry is unreadable or inconsistent."""


class ConfigMismatchError(SelretError):
    """Two pieces (encoder, index, cache) were built with different configurations."""


class CorruptIndexError(SelretError):
    """An index directory is unreadable, of an unknown format, or its parts disagree."""


class IndexConflictError(SelretError):
    """Another writer saved the index after this handle opened it; reopen and redo the change."""


class DatasetError(SelretError):
    """A ground-truth file or image folder cannot be used. ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
