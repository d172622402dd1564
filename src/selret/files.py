"""Files on disk, in one place for every stage: atomic writes, content digests, image listing (with
what was skipped and why), the default feature-cache folder, and the crash-injection hook.

Everything the product writes goes through :func:`atomic_write`, so a crash or a kill leaves the old
file or the new one, never half of one. :func:`crash_point` lets tests prove it: with
``SELRET_CRASH_AT=NAME:N`` in the environment the process kills itself (SIGKILL) the N-th time it
reaches the point ``NAME``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from selret.errors import DatasetError, ImageNotFoundError

__all__ = [
    "CRASH_ENV",
    "DEFAULT_CACHE",
    "IMAGE_EXTENSIONS",
    "ScanResult",
    "Skipped",
    "atomic_write",
    "atomic_write_text",
    "crash_point",
    "default_cache_dir",
    "file_digest",
    "file_type_reason",
    "is_image_name",
    "list_images",
    "scan_images",
    "sha256_of",
]

#: File name suffixes treated as images when scanning folders (lower case).
#: GIF is decoded as its first frame (like a multi-page TIFF); vector formats (SVG) are not images
#: to a convolutional network and are reported as skipped.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".ppm", ".pgm", ".gif",
)  # fmt: skip

# Why some common non-image or unsupported files are skipped, beyond "unsupported extension".
_SKIP_HINTS = {
    ".svg": "SVG is a vector format; rasterise it (to PNG, say) to index it",
    ".svgz": "SVG is a vector format; rasterise it (to PNG, say) to index it",
    ".heic": "HEIC is not decoded by Pillow; convert it to JPEG to index it",
    ".heif": "HEIF is not decoded by Pillow; convert it to JPEG to index it",
}

#: Feature cache used when neither ``--cache`` nor ``$SELRET_CACHE`` names one.
DEFAULT_CACHE = Path("~/.cache/selret/features")


def default_cache_dir() -> Path:
    """``$SELRET_CACHE`` if set, else ``~/.cache/selret/features``."""
    return Path(os.environ.get("SELRET_CACHE") or DEFAULT_CACHE).expanduser()


def is_image_name(name: str | Path) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def file_type_reason(mode: int) -> str:
    """Why a file of ``st_mode`` ``mode`` is no image file (a directory, a FIFO, ...)."""
    for test, what in (
        (stat.S_ISDIR, "is a directory, not an image file"),
        (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
        (stat.S_ISSOCK, "is a socket, not a regular file"),
        (stat.S_ISCHR, "is a character device, not a regular file"),
        (stat.S_ISBLK, "is a block device, not a regular file"),
    ):
        if test(mode):
            return what
    return "not a regular file"


@dataclass(frozen=True)
class Skipped:
    """A file or folder a folder scan left out. ``kind`` is one of ``hidden``, ``extension``
    (unsupported), ``broken-link``, ``not-a-file`` (FIFO, socket, device, or a folder named like an
    image, whose content is scanned), ``link-to-folder`` (not followed) and ``unreadable``."""

    path: Path
    kind: str
    reason: str


@dataclass
class ScanResult:
    """What :func:`scan_images` found: ``images`` to use and what it ``skipped``, with reasons."""

    images: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skipped_counts(self) -> dict[str, int]:
        """Number of skipped entries per kind, most frequent first."""
        return dict(Counter(s.kind for s in self.skipped).most_common())


def _scan_entry(path: Path, name: str) -> Skipped | None:
    """Why the folder entry ``path`` (not a folder to descend into) is no image to use, or None."""
    if name.startswith("."):
        return Skipped(path, "hidden", "hidden file")
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return Skipped(path, "broken-link", f"broken symbolic link (to {os.readlink(path)})")
        return Skipped(path, "unreadable", "vanished during the scan")
    except OSError as exc:
        return Skipped(path, "unreadable", f"cannot access: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return Skipped(path, "not-a-file", file_type_reason(st.st_mode))
    if not is_image_name(name):
        suffix = Path(name).suffix.lower()
        hint = _SKIP_HINTS.get(suffix)
        what = f"unsupported extension {suffix!r}" if suffix else "no file extension"
        return Skipped(path, "extension", f"{what}; {hint}" if hint else what)
    return None


def _scan_folder(root: Path) -> ScanResult:
    result = ScanResult()

    def unreadable(exc: OSError) -> None:
        result.skipped.append(
            Skipped(Path(exc.filename or root), "unreadable", f"cannot read folder: {exc.strerror}")
        )

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        folder = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            path = folder / d
            if d.startswith("."):
                result.skipped.append(Skipped(path, "hidden", "hidden folder (not scanned)"))
            elif path.is_symlink():
                # Not followed: a link may point back up the tree, or out of the data set.
                result.skipped.append(
                    Skipped(path, "link-to-folder", "symbolic link to a folder (not followed)")
                )
            else:
                if is_image_name(d):
                    result.skipped.append(
                        Skipped(
                            path, "not-a-file", "a folder named like an image (scanned as a folder)"
                        )
                    )
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            skipped = _scan_entry(folder / f, f)
            if skipped is None:
                result.images.append(folder / f)
            else:
                result.skipped.append(skipped)
    result.images.sort()
    result.skipped.sort(key=lambda s: s.path)
    return result


def _read_list_file(src: Path) -> list[Path]:
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(
            src, "not a list of image paths (not UTF-8 text) nor a file with an image extension"
        ) from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else src.parent / p)
    return out


def scan_images(source: str | Path) -> ScanResult:
    """The image files named by ``source``, and what was left out and why.

    ``source`` is a folder (scanned recursively for :data:`IMAGE_EXTENSIONS`, sorted; hidden files
    and folders, other extensions, broken links, FIFOs and other non-regular files, links to
    folders and unreadable folders are listed in ``skipped``), a file with an image extension (that
    one image) or a text file with one path per line (blank lines and ``#`` comments skipped;
    relative paths are taken relative to the list file's folder, order kept; entries are checked
    when they are read, not here). Raises FileNotFoundError when ``source`` is none of these and
    DatasetError for a list file that is not UTF-8 text.
    """
    src = Path(source).expanduser()
    if src.is_dir():
        return _scan_folder(src)
    if src.is_file():
        return ScanResult(images=[src] if is_image_name(src) else _read_list_file(src))
    raise FileNotFoundError(f"{src}: no such folder or list file")


def list_images(source: str | Path) -> list[Path]:
    """The images of :func:`scan_images` (what it skipped is dropped: callers that report to a user
    use :func:`scan_images`)."""
    return scan_images(source).images


def sha256_of(path: str | Path) -> str:
    """sha256 (hex) of the bytes of ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _regular_file_stat(path: str | Path) -> tuple[Path, os.stat_result]:
    """(resolved path, its stat); ImageNotFoundError if it is missing or not a regular file."""
    p = Path(path).expanduser()
    try:
        resolved = p.resolve()
        st = resolved.stat()
    except OSError as exc:
        raise ImageNotFoundError(p, f"cannot read file: {exc.strerror or exc}") from None
    # Checked before opening: reading a FIFO would block until someone writes to it.
    if not stat.S_ISREG(st.st_mode):
        raise ImageNotFoundError(p, file_type_reason(st.st_mode))
    return resolved, st


def file_stamp(path: str | Path) -> list[int]:
    """[size, mtime in ns, inode] of image file ``path`` (after links): what ``index add`` compares
    to decide, without reading the file, that it has not changed since it was hashed.
    ImageNotFoundError when it is missing or not a regular file."""
    st = _regular_file_stat(path)[1]
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_digest(path: str | Path, fresh: bool = False) -> str:
    """sha256 (hex) of the bytes of image file ``path``; ImageNotFoundError when it cannot be read.

    A file whose stat (size, mtime, inode) is unchanged is not read again within one process,
    unless ``fresh``: then it is read, and what it holds now is what later calls get (so the
    feature cache, keyed by this digest, follows a change that kept the stat).
    """
    resolved, st = _regular_file_stat(path)
    key = (str(resolved), st.st_size, st.st_mtime_ns, st.st_ino)
    if not fresh:
        with _digests_lock:
            if key in _digests:
                _digests.move_to_end(key)
                return _digests[key]
    try:
        digest = sha256_of(resolved)
    except OSError as exc:
        raise ImageNotFoundError(
            Path(path).expanduser(), f"cannot read file: {exc.strerror or exc}"
        ) from None
    with _digests_lock:
        _digests[key] = digest
        _digests.move_to_end(key)
        if len(_digests) > _MAX_DIGESTS:
            _digests.popitem(last=False)
    return digest


# Bounded: a long-lived process (a server indexing millions of files) must not keep every digest.
_MAX_DIGESTS = 1 << 16
_digests: OrderedDict[tuple, str] = OrderedDict()
_digests_lock = threading.Lock()


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
        crash_point("atomic_write.before_rename")
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


#: Environment variable of :func:`crash_point`: ``NAME:N`` (several separated by commas).
CRASH_ENV = "SELRET_CRASH_AT"

_crash_counts: Counter[str] = Counter()
_crash_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Crash-injection hook for tests: kill this process the N-th time it reaches point ``name``.

    Does nothing unless ``$SELRET_CRASH_AT`` names the point as ``NAME:N`` (several such, separated
    by commas; ``N`` counts from 1 within one process). The process then sends itself SIGKILL
    (``os._exit(137)`` where there is none): no ``finally`` block, ``atexit`` handler or buffered
    write runs, as when the machine loses power or the OOM killer strikes. Points in selret:
    ``atomic_write.before_rename`` (data written and fsynced, not yet renamed), ``cache.mid_write``
    (half of a feature-cache entry written), ``extract.after_write`` (a cache entry renamed into
    place) and ``extract.between_batches`` (a batch's entries all written).
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, count = item.strip().rpartition(":")
        if point != name:
            continue
        if not count.isdigit():
            raise ValueError(f"${CRASH_ENV}: {item.strip()!r} is not NAME:N")
        with _crash_lock:
            _crash_counts[name] += 1
            hit = _crash_counts[name] == int(count)
        if hit:
            if hasattr(signal, "SIGKILL"):
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)
