"""The files of an :class:`~selret.search.store.ImageIndex` directory: state directories, the
``CURRENT`` pointer, the writer lock and the catalog schema (with the migration of older formats).

Also the catalog's row format (:class:`ImageRecord`, :func:`catalog_row`). Everything else here
works on paths; :mod:`selret.search.store` holds the in-memory index. The writers of
one save are module-level functions so that tests can make them fail mid-save.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from selret.errors import CorruptIndexError, IndexLockTimeout, NotAnIndexError
from selret.files import atomic_write, atomic_write_text
from selret.search.vectors import VectorIndex

try:  # advisory lock between writer processes; absent on Windows, where saves are unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT_VERSION = 2
"""Version of the on-disk layout. 2: the catalog records each file's sha256 (column ``sha256``).
Version 1 indexes are read too: their rows have no sha256 (NULL, "unknown") until re-encoded."""
READABLE_VERSIONS = (1, 2)

CURRENT = "CURRENT"
LOCK = "LOCK"
MANIFEST = "manifest.json"
CATALOG = "catalog.sqlite"
VECTORS = "vectors.faiss"
STATE_PREFIX = "state-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of removed images are never reused
    path TEXT NOT NULL UNIQUE,
    content_sha1 TEXT,
    width INTEGER,
    height INTEGER,
    added_at TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    sha256 TEXT  -- of the file's bytes when it was encoded; NULL: unknown (format 1)
)
"""
COLUMNS = "id, path, content_sha1, width, height, added_at, metadata, sha256"
SQL_CHUNK = 900  # bound parameters per statement, under SQLite's oldest limit (999)


@dataclass(frozen=True)
class ImageRecord:
    """One catalog row. ``added_at`` is an ISO-8601 UTC timestamp; ``sha256`` is the digest of the
    file's bytes when it was encoded (None for images indexed by selret before format 2, or added
    without one)."""

    id: int
    path: str
    content_sha1: str | None
    width: int | None
    height: int | None
    added_at: str
    metadata: dict[str, Any]
    sha256: str | None = None


_RESERVED_METADATA = ("content_sha1", "width", "height", "sha256")
#: Metadata key of a file's [size, mtime_ns, inode] when it was hashed (``selret.files.file_stamp``).
FILE_STAMP = "file_stamp"


class FileRecord(NamedTuple):
    """What the catalog recorded of an indexed file (None: not recorded)."""

    sha256: str | None
    stamp: list[int] | None


def _opt(kind: type, value: Any) -> Any:
    # SQLite binds Python scalars only (not numpy ones); None stays NULL.
    return None if value is None else kind(value)


INSERT = (
    "INSERT INTO images (path, content_sha1, width, height, added_at, metadata, sha256) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def catalog_row(path: str, meta: dict | None, added_at: str) -> tuple:
    """The catalog row of one image (``INSERT``'s parameters)."""
    extra = dict(meta or {})
    sha1, width, height, sha256 = (extra.pop(name, None) for name in _RESERVED_METADATA)
    return (
        path,
        _opt(str, sha1),
        _opt(int, width),
        _opt(int, height),
        added_at,
        json.dumps(extra),
        _opt(str, sha256),
    )


def image_record(row: tuple) -> ImageRecord:
    """An :class:`ImageRecord` of a row selected as ``storage.COLUMNS``."""
    id_, path, sha1, width, height, added_at, metadata, sha256 = row
    return ImageRecord(id_, path, sha1, width, height, added_at, json.loads(metadata), sha256)


def chunks(items: Sequence, size: int = SQL_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def new_catalog() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute(SCHEMA)
    db.commit()
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a catalog of an older format to the current schema, in memory."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
    if "sha256" not in columns:  # format 1
        db.execute("ALTER TABLE images ADD COLUMN sha256 TEXT")
        db.commit()


# ------------------------------------------------------------------ the writers of one save
# Each file is written with selret.files.atomic_write, which fsyncs it and then its directory.
def write_vectors(vectors: VectorIndex, path: Path) -> None:
    vectors.save(path)


def write_catalog(db: sqlite3.Connection, path: Path) -> None:
    data = db.serialize()
    atomic_write(path, lambda fh: fh.write(data))


def write_manifest(manifest: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True))


def commit_pointer(root: Path, state: str) -> None:
    """Make ``state`` the live one: the single atomic step of a save."""
    atomic_write_text(root / CURRENT, state + "\n")


# ------------------------------------------------------------------ state directories
def state_name(number: int) -> str:
    return f"{STATE_PREFIX}{number:06d}"


def state_number(state: str) -> int:
    return int(state.rsplit("-", 1)[1])


def read_current(root: Path) -> str:
    try:
        return (root / CURRENT).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        raise NotAnIndexError(f"{root}: not a selret index (no {CURRENT} file)") from None


def leftovers(root: Path, live: str | None) -> list[Path]:
    """What interrupted saves left in ``root``: state directories other than ``live`` and
    half-written pointer files. Never read; removed by the next save."""
    found = [p for p in root.glob(f"{STATE_PREFIX}*") if p.name != live]
    return sorted(found + list(root.glob(f".{CURRENT}.*.part")))


def clear_leftovers(root: Path, live: str | None) -> None:
    for path in leftovers(root, live):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def load_state(state_dir: Path) -> tuple[dict, sqlite3.Connection, VectorIndex]:
    """(manifest, in-memory catalog, vectors) of one state directory, checked for agreement."""
    try:
        manifest = json.loads((state_dir / MANIFEST).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptIndexError(f"{state_dir / MANIFEST}: not valid JSON ({e})") from e
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CorruptIndexError(
            f"{state_dir}: format_version {manifest.get('format_version')!r} is not one this "
            f"selret reads ({', '.join(map(str, READABLE_VERSIONS))})"
        )
    catalog = state_dir / CATALOG
    if not catalog.is_file():
        raise FileNotFoundError(f"{catalog}: missing")
    src = sqlite3.connect(f"{catalog.resolve().as_uri()}?mode=ro", uri=True)
    db = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        src.backup(db)
        _migrate(db)
    except sqlite3.DatabaseError as e:
        raise CorruptIndexError(f"{catalog}: {e}") from e
    finally:
        src.close()
    vectors_path = state_dir / VECTORS
    params = manifest["index_params"]
    kind = manifest["kind"]
    if vectors_path.exists():
        vectors = VectorIndex.load(vectors_path, kind="auto" if kind == "auto" else None, **params)
    else:
        vectors = VectorIndex(manifest["dim"], kind, **params)
    catalog_ids = np.array([r[0] for r in db.execute("SELECT id FROM images")], np.int64)
    if vectors.dim != manifest["dim"] or not np.array_equal(
        np.sort(catalog_ids), np.sort(vectors.ids)
    ):
        raise CorruptIndexError(
            f"{state_dir}: catalog ({len(catalog_ids)} images) and vectors "
            f"({vectors.ntotal}, dim {vectors.dim}) disagree"
        )
    return manifest, db, vectors


# ------------------------------------------------------------------ the writer lock
def _lock_holder(fh) -> str:
    fh.seek(0)
    pid = fh.read().strip()
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def writer_lock(
    root: Path,
    timeout: float | None = None,
    on_wait: Callable[[str], object] | None = None,
) -> Iterator[None]:
    """Hold the index's writer lock (an advisory ``flock`` on ``root/LOCK``).

    When another writer holds it, call ``on_wait(holder)`` once (``holder``: "pid 1234") and
    wait: for ever with ``timeout=None``, else at most ``timeout`` seconds, then raise
    :class:`~selret.errors.IndexLockTimeout`. The holder's pid is written into the file.
    """
    while True:
        fh = open(root / LOCK, "a+")
        if fcntl is None:
            break
        try:
            _acquire(fh, root, timeout, on_wait)
        except BaseException:
            fh.close()
            raise
        # `index build --force` may have replaced the whole directory while this one waited:
        # then the lock held is the old one's; lock the live file instead.
        try:
            live = os.stat(root / LOCK)
        except FileNotFoundError:
            live = None
        mine = os.fstat(fh.fileno())
        if live is not None and (live.st_ino, live.st_dev) == (mine.st_ino, mine.st_dev):
            break
        fh.close()
    with fh:
        if fcntl is not None:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
        yield  # closing the file releases the lock


def _acquire(fh, root: Path, timeout: float | None, on_wait) -> None:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        holder = _lock_holder(fh)
    if on_wait is not None:
        on_wait(holder)
    if timeout is None:
        fcntl.flock(fh, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise IndexLockTimeout(
                    f"{root}: locked by another writer ({_lock_holder(fh)}); gave up after "
                    f"waiting {timeout:g} s"
                ) from None


def config_differences(stored: dict, expected: dict) -> str:
    keys = sorted(set(stored) | set(expected))
    diffs = [
        f"{key}: index {stored.get(key, '<unset>')!r} vs encoder {expected.get(key, '<unset>')!r}"
        for key in keys
        if stored.get(key) != expected.get(key)
    ]
    return "; ".join(diffs) or "none (same settings, different fingerprints)"
