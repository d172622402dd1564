"""Files on disk, in one place for every stage: atomic writes, content digests, image listing and
the default feature-cache folder.

Everything the product writes goes through :func:`atomic_write`, so a crash or a kill leaves the old
file or the new one, never half of one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from selret.errors import ImageNotFoundError

__all__ = [
    "DEFAULT_CACHE",
    "IMAGE_EXTENSIONS",
    "atomic_write",
    "atomic_write_text",
    "default_cache_dir",
    "file_digest",
    "is_image_name",
    "list_images",
    "sha256_of",
]

#: File name suffixes treated as images when scanning folders (lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".ppm", ".pgm",
)  # fmt: skip

#: Feature cache used when neither ``--cache`` nor ``$SELRET_CACHE`` names one.
DEFAULT_CACHE = Path("~/.cache/selret/features")


def default_cache_dir() -> Path:
    """``$SELRET_CACHE`` if set, else ``~/.cache/selret/features``."""
    return Path(os.environ.get("SELRET_CACHE") or DEFAULT_CACHE).expanduser()


def is_image_name(name: str | Path) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_images(source: str | Path) -> list[Path]:
    """Image files named by ``source``: a folder (scanned recursively for :data:`IMAGE_EXTENSIONS`,
    hidden files and folders skipped, sorted) or a text file with one path per line (blank lines
    and ``#`` comments skipped; relative paths are taken relative to the list file's folder, order
    kept). Raises FileNotFoundError when ``source`` is neither."""
    src = Path(source).expanduser()
    if src.is_dir():
        out = []
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            out.extend(
                Path(dirpath) / f
                for f in filenames
                if not f.startswith(".") and is_image_name(f) and (Path(dirpath) / f).is_file()
            )
        return sorted(out)
    if src.is_file():
        out = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line).expanduser()
                out.append(p if p.is_absolute() else src.parent / p)
        return out
    raise FileNotFoundError(f"{src}: no such folder or list file")


def sha256_of(path: str | Path) -> str:
    """sha256 (hex) of the bytes of ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of the bytes of image file ``path``; ImageNotFoundError when it cannot be read.

    A file whose stat (size, mtime, inode) is unchanged is not read again within one process.
    """
    p = Path(path).expanduser()
    try:
        resolved = p.resolve()
        st = resolved.stat()
        return _content_digest(str(resolved), st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError as exc:
        raise ImageNotFoundError(p, f"cannot read file: {exc.strerror or exc}") from None


# Bounded: a long-lived process (a server indexing millions of files) must not keep every digest.
@functools.lru_cache(maxsize=1 << 16)
def _content_digest(resolved: str, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_of(resolved)


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write(fh)`` writes, all or nothing.

    The data goes to a temporary file in the same directory (same file system, so the rename is
    atomic), is fsynced, then renamed over ``path``; the directory is fsynced to persist the rename.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        # mkstemp creates 0600 files; what selret writes is meant to be shared like ordinary files.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Nothing partial may remain, whatever interrupted the write (including Ctrl-C).
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    data = text.encode()
    atomic_write(path, lambda fh: fh.write(data))
