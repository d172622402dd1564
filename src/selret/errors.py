"""Typed errors. Every error about a file names the file and the reason.

Each class carries the exit code the ``selret`` command ends with when it stops on it
(:class:`ExitCode`, documented as one table in ``docs/CLI.md``) and an optional ``hint``: what
the user can do about it. The CLI prints ``error: <message>`` and ``hint: <hint>``, one line each.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Exit codes of the ``selret`` command (the one table; see ``docs/CLI.md``)."""

    OK = 0
    ERROR = 1  # any other selret error
    USAGE = 2  # bad command line (typer/click's own code), or an option value that cannot apply
    INPUT = 3  # an image, folder, list file or data set is missing, unreadable or unusable
    INDEX = 4  # an index is missing, corrupt, already exists, locked, or inconsistent
    MISMATCH = 5  # two pieces were made with different configurations (encoder vs index)
    ENCODER = 6  # an encoder file or backbone weights are missing, corrupt or unknown


class SelretError(Exception):
    """Base class of every error selret raises on purpose.

    ``hint`` (keyword, or a class attribute) says what to do about it; ``exit_code`` is the
    command's exit status when it stops on this error.
    """

    exit_code: ExitCode = ExitCode.ERROR
    hint: str | None = None

    def __init__(self, *args: object, hint: str | None = None):
        super().__init__(*args)
        if hint is not None:
            self.hint = hint


class ImageError(SelretError):
    """An image could not be used. ``path`` names it, ``reason`` says why."""

    exit_code = ExitCode.INPUT

    def __init__(self, path: str | Path | None, reason: str, *, hint: str | None = None):
        self.path = str(path) if path is not None else "<bytes>"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}", hint=hint)


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

    exit_code = ExitCode.USAGE  # the box is an option value the user gave


class NoImagesError(ImageError):
    """A folder or list file holds no usable image (none found, or every one failed)."""


class WeightsError(SelretError):
    """Backbone weights are missing, corrupt or do not fit the network."""

    exit_code = ExitCode.ENCODER


class EncoderError(SelretError):
    """An encoder cannot be used: its file is missing, corrupt or of another format, or its name
    is unknown."""

    exit_code = ExitCode.ENCODER
    hint = (
        "restore or replace the encoder file (`selret fit` makes one; `selret encoders` lists "
        "the pre-trained ones)"
    )


class CacheError(SelretError):
    """A feature-cache entry is unreadable or inconsistent."""


class ConfigMismatchError(SelretError):
    """Two pieces (encoder, index, cache) were built with different configurations."""

    exit_code = ExitCode.MISMATCH


class IndexStoreError(SelretError):
    """Base of the errors about an index directory (exit code 4)."""

    exit_code = ExitCode.INDEX


class NotAnIndexError(IndexStoreError, FileNotFoundError):
    """The directory does not hold a selret index. (Also a FileNotFoundError, as before.)"""

    hint = "create one with `selret index build IMAGES --index DIR`"


class IndexExistsError(IndexStoreError, FileExistsError):
    """A new index was asked for where one (or other files) already is."""

    hint = (
        "add images to it with `selret index add IMAGES --index DIR`, or replace it with "
        "`selret index build ... --force`"
    )


class CorruptIndexError(IndexStoreError):
    """An index directory is unreadable, of an unknown format, or its parts disagree."""


class IndexConflictError(IndexStoreError):
    """Another writer saved the index after this handle opened it; reopen and redo the change."""


class IndexLockTimeout(IndexStoreError):
    """Another writer held the index lock longer than this one was willing to wait."""

    hint = "retry when the other writer is done, or wait longer with --lock-timeout SECONDS"


class IndexInconsistentError(IndexStoreError):
    """``selret index verify`` found entries that no longer match their files or encoder."""


class DatasetError(SelretError):
    """A ground-truth file or image folder cannot be used. ``path`` names it, ``reason`` says why."""

    exit_code = ExitCode.INPUT

    def __init__(self, path: str | Path, reason: str, *, hint: str | None = None):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}", hint=hint)
