"""The persistent image index: :class:`ImageIndex`, a directory pairing a
:class:`~selret.search.vectors.VectorIndex` with a SQLite catalog of the indexed images and a
manifest naming the encoder that made the vectors.

Saves are atomic (a new state directory, then one atomic switch of ``CURRENT``); writer processes
are serialised by a lock file; opening checks the encoder fingerprint. SPEC section 8.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selret.errors import ConfigMismatchError, CorruptIndexError, IndexConflictError
from selret.files import atomic_write, atomic_write_text
from selret.search.hits import SearchHit, search_hits
from selret.search.vectors import VectorIndex, as_matrix

try:  # advisory lock between writer processes; absent on Windows, where saves are unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["FORMAT_VERSION", "ImageIndex", "ImageRecord"]

FORMAT_VERSION = 1
"""Version of the on-disk layout of :class:`ImageIndex`."""


@dataclass(frozen=True)
class ImageRecord:
    """One catalog row. ``added_at`` is an ISO-8601 UTC timestamp."""

    id: int
    path: str
    content_sha1: str | None
    width: int | None
    height: int | None
    added_at: str
    metadata: dict[str, Any]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of removed images are never reused
    path TEXT NOT NULL UNIQUE,
    content_sha1 TEXT,
    width INTEGER,
    height INTEGER,
    added_at TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}'
)
"""
_COLUMNS = "id, path, content_sha1, width, height, added_at, metadata"
_RESERVED_METADATA = ("content_sha1", "width", "height")
_SQL_CHUNK = 900  # bound parameters per statement, under SQLite's oldest limit (999)

_CURRENT = "CURRENT"
_LOCK = "LOCK"
_MANIFEST = "manifest.json"
_CATALOG = "catalog.sqlite"
_VECTORS = "vectors.faiss"


def _opt(kind: type, value: Any) -> Any:
    # SQLite binds Python scalars only (not numpy ones); None stays NULL.
    return None if value is None else kind(value)


def _chunks(items: Sequence, size: int = _SQL_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# The writers of one save, module-level so that tests can make them fail mid-save. Each file is
# written with selret.files.atomic_write, which fsyncs it and then its directory.
def _write_vectors(vectors: VectorIndex, path: Path) -> None:
    vectors.save(path)


def _write_catalog(db: sqlite3.Connection, path: Path) -> None:
    data = db.serialize()
    atomic_write(path, lambda fh: fh.write(data))


def _write_manifest(manifest: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True))


def _commit_pointer(root: Path, state: str) -> None:
    """Make ``state`` the live one: the single atomic step of a save."""
    atomic_write_text(root / _CURRENT, state + "\n")


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    with open(root / _LOCK, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _state_number(state: str) -> int:
    return int(state.rsplit("-", 1)[1])


def _read_current(root: Path) -> str:
    try:
        return (root / _CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: not a selret index (no {_CURRENT} file)") from None


def _config_differences(stored: dict, expected: dict) -> str:
    keys = sorted(set(stored) | set(expected))
    diffs = [
        f"{key}: index {stored.get(key, '<unset>')!r} vs encoder {expected.get(key, '<unset>')!r}"
        for key in keys
        if stored.get(key) != expected.get(key)
    ]
    return "; ".join(diffs) or "none (same settings, different fingerprints)"


class ImageIndex:
    """A persistent image index: vectors, a catalog of the images, and the encoder that made them.

    On disk, a directory::

        CURRENT                 names the live state directory (replaced atomically)
        LOCK                    serialises writer processes
        state-000007/
            manifest.json       format_version, encoder_config, encoder_fingerprint, dim,
                                kind, index_kind, index_params, count
            catalog.sqlite      table images(id, path, content_sha1, width, height,
                                             added_at, metadata JSON)
            vectors.faiss       the VectorIndex, ids = catalog ids (absent while an IVF-PQ
                                index is empty and untrained)

    Changes live in memory until :meth:`save`, which writes a whole new state directory, then
    switches ``CURRENT`` to it with one ``os.replace`` and deletes the old one: a crash at any
    point leaves the previous state openable, its catalog and vectors in agreement. One writer
    at a time: a save refuses (:class:`IndexConflictError`) if another handle saved in between.

    Images are keyed by their path string exactly as given (pass normalised paths). Catalog ids
    are assigned from 1 up, never reused, and unchanged by removals. Create with :meth:`create`,
    reopen with :meth:`open`. A handle is safe to share between threads (calls are serialised).
    """

    def __init__(
        self, root: Path, state: str, manifest: dict, db: sqlite3.Connection, vectors: VectorIndex
    ):
        # Use ImageIndex.create / ImageIndex.open.
        self.root = root
        self._state = state
        self._manifest = manifest
        self._db = db
        self._vectors = vectors
        self._lock = threading.RLock()
        self._dirty = False

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        dim: int,
        encoder_config: dict,
        fingerprint: str,
        kind: str = "exact",
        **index_params: Any,
    ) -> ImageIndex:
        """Create an empty index at ``path`` (a new or empty directory) and save it.

        ``encoder_config`` (JSON-serialisable) and ``fingerprint`` describe the encoder whose
        vectors this index holds; :meth:`open` checks the fingerprint. ``kind`` and
        ``index_params`` are those of :class:`VectorIndex`.
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(f"{root}: exists and is not an empty directory")
        vectors = VectorIndex(dim, kind, **index_params)
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder_config": json.loads(json.dumps(encoder_config)),
            "encoder_fingerprint": str(fingerprint),
            "dim": int(dim),
            "kind": kind,
            "index_params": vectors.params,
        }
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.execute(_SCHEMA)
        db.commit()
        root.mkdir(parents=True, exist_ok=True)
        created = cls(root, "state-000000", manifest, db, vectors)
        created._save(first=True)
        return created

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_fingerprint: str | None = None,
        expected_config: dict | None = None,
    ) -> ImageIndex:
        """Open the index at ``path``, loading it into memory.

        With ``expected_fingerprint``, refuse (:class:`~selret.errors.ConfigMismatchError`) an
        index built by another encoder; ``expected_config`` only makes that message list the
        differing settings. Raises :class:`CorruptIndexError` when the state is unreadable or
        its catalog and vectors disagree.
        """
        root = Path(path)
        for _ in range(5):  # a writer may delete the state we picked while we read it: retry
            state = _read_current(root)
            try:
                manifest, db, vectors = cls._load_state(root / state)
                break
            except (FileNotFoundError, CorruptIndexError):
                if _read_current(root) == state:
                    raise
        else:  # pragma: no cover - five concurrent saves in a row
            raise IndexConflictError(f"{root}: the index kept changing while being opened")
        stored = manifest["encoder_fingerprint"]
        if expected_fingerprint is not None and expected_fingerprint != stored:
            detail = (
                f"differing settings: {_config_differences(manifest['encoder_config'], expected_config)}"
                if expected_config is not None
                else f"index encoder config: {json.dumps(manifest['encoder_config'], sort_keys=True)}"
            )
            raise ConfigMismatchError(
                f"{root}: index was built with encoder fingerprint {stored!r}, but the encoder "
                f"in use has fingerprint {expected_fingerprint!r}; {detail}. Rebuild the index "
                "with this encoder or use the encoder it was built with."
            )
        return cls(root, state, manifest, db, vectors)

    @staticmethod
    def _load_state(state_dir: Path) -> tuple[dict, sqlite3.Connection, VectorIndex]:
        try:
            manifest = json.loads((state_dir / _MANIFEST).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CorruptIndexError(f"{state_dir / _MANIFEST}: not valid JSON ({e})") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CorruptIndexError(
                f"{state_dir}: format_version {manifest.get('format_version')!r} is not "
                f"{FORMAT_VERSION}, the one this selret reads"
            )
        catalog = state_dir / _CATALOG
        if not catalog.is_file():
            raise FileNotFoundError(f"{catalog}: missing")
        src = sqlite3.connect(f"{catalog.resolve().as_uri()}?mode=ro", uri=True)
        db = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            src.backup(db)
        except sqlite3.DatabaseError as e:
            raise CorruptIndexError(f"{catalog}: {e}") from e
        finally:
            src.close()
        vectors_path = state_dir / _VECTORS
        params = manifest["index_params"]
        kind = manifest["kind"]
        if vectors_path.exists():
            vectors = VectorIndex.load(
                vectors_path, kind="auto" if kind == "auto" else None, **params
            )
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

    # ----------------------------------------------------------------- saving
    def save(self) -> None:
        """Commit the in-memory state to disk atomically (see the class docstring)."""
        with self._lock:
            self._save(first=False)

    def _save(self, first: bool) -> None:
        with _writer_lock(self.root):
            if not first:
                on_disk = _read_current(self.root)
                if on_disk != self._state:
                    raise IndexConflictError(
                        f"{self.root}: saved by another writer ({on_disk}) since this handle "
                        f"opened {self._state}; reopen it and redo the change"
                    )
            old = None if first else self._state
            # Leftovers of crashed saves are never live: clear them so the new name is free.
            for leftover in self.root.glob("state-*"):
                if leftover.name != old:
                    shutil.rmtree(leftover)
            for leftover in self.root.glob(f".{_CURRENT}.*.part"):  # of a killed commit
                leftover.unlink(missing_ok=True)
            new = f"state-{0 if first else _state_number(old) + 1:06d}"
            state_dir = self.root / new
            state_dir.mkdir()
            manifest = {
                **self._manifest,
                "index_kind": self._vectors.index_kind,
                "index_params": self._vectors.params,
                "count": len(self),
            }
            if self._vectors.is_trained:
                _write_vectors(self._vectors, state_dir / _VECTORS)
            _write_catalog(self._db, state_dir / _CATALOG)
            _write_manifest(manifest, state_dir / _MANIFEST)
            _commit_pointer(self.root, new)
            self._state, self._manifest, self._dirty = new, manifest, False
            if old is not None:
                shutil.rmtree(self.root / old, ignore_errors=True)

    # ----------------------------------------------------------------- catalog
    def __len__(self) -> int:
        return self._vectors.ntotal

    @property
    def dim(self) -> int:
        return self._manifest["dim"]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the encoder this index's vectors come from."""
        return self._manifest["encoder_fingerprint"]

    @property
    def encoder_config(self) -> dict:
        return self._manifest["encoder_config"]

    def _ids_of_paths(self, paths: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(paths):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT path, id FROM images WHERE path IN ({marks})", chunk)
            found.update(rows)
        return found

    def _rows(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        records: dict[int, ImageRecord] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {_COLUMNS} FROM images WHERE id IN ({marks})"
            for row in self._db.execute(sql, chunk):
                records[row[0]] = ImageRecord(*row[:6], metadata=json.loads(row[6]))
        return records

    def missing(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """The paths (as strings, first occurrences, in order) that are not indexed yet."""
        wanted = list(dict.fromkeys(os.fspath(p) for p in paths))
        with self._lock:
            present = self._ids_of_paths(wanted)
        return [p for p in wanted if p not in present]

    def get(self, key: int | str | os.PathLike) -> ImageRecord:
        """The catalog record of an id (int) or path (str); KeyError if absent."""
        with self._lock:
            if isinstance(key, int | np.integer):
                id_ = int(key)
            else:
                id_ = self._ids_of_paths([os.fspath(key)]).get(os.fspath(key), -1)
            record = self._rows([id_]).get(id_)
        if record is None:
            raise KeyError(key)
        return record

    def add(
        self,
        paths: Sequence[str | os.PathLike],
        vectors: np.ndarray,
        metadata: Sequence[dict | None] | None = None,
    ) -> list[int]:
        """Index images not indexed yet. Returns the new ids, in the order of the added paths.

        ``vectors`` is (len(paths), D); rows of paths already indexed (or repeated in
        ``paths``) are skipped, so re-adding a folder is cheap -- and :meth:`missing` tells
        which paths to encode at all. ``metadata`` dicts are stored as JSON; their keys
        ``content_sha1``, ``width`` and ``height`` fill the catalog columns of those names.
        """
        keys = [os.fspath(p) for p in paths]
        x = as_matrix(vectors, self.dim, "vectors")
        if len(x) != len(keys):
            raise ValueError(f"{len(keys)} paths but {len(x)} vectors")
        metas = list(metadata) if metadata is not None else [None] * len(keys)
        if len(metas) != len(keys):
            raise ValueError(f"{len(keys)} paths but {len(metas)} metadata entries")
        added_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        with self._lock:
            new = set(self.missing(keys))
            rows, keep = [], []
            for i, (key, meta) in enumerate(zip(keys, metas, strict=True)):
                if key not in new:
                    continue
                new.discard(key)  # a path repeated in this batch is added once
                extra = dict(meta or {})
                sha1, width, height = (extra.pop(name, None) for name in _RESERVED_METADATA)
                rows.append(
                    (
                        key,
                        _opt(str, sha1),
                        _opt(int, width),
                        _opt(int, height),
                        added_at,
                        json.dumps(extra),
                    )
                )
                keep.append(i)
            if not rows:
                return []
            sql = (
                "INSERT INTO images (path, content_sha1, width, height, added_at, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            )
            with self._db:  # one transaction: rolled back if the vectors cannot be added
                ids = [self._db.execute(sql, row).lastrowid for row in rows]
                self._vectors.add(x[keep], np.asarray(ids, np.int64))
            self._dirty = True
            return ids

    def remove(self, items: Iterable[int | str | os.PathLike]) -> int:
        """Remove images given by id (int) or path (str); unknown ones are ignored.

        Returns the number removed. The ids of the remaining images do not change.
        """
        items = list(items)
        ids = {int(i) for i in items if isinstance(i, int | np.integer)}
        paths = [os.fspath(i) for i in items if not isinstance(i, int | np.integer)]
        with self._lock:
            ids.update(self._ids_of_paths(paths).values())
            ids = sorted(self._rows(sorted(ids)))  # keep those in the catalog
            if not ids:
                return 0
            with self._db:
                for chunk in _chunks(ids):
                    marks = ",".join("?" * len(chunk))
                    self._db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
                self._vectors.remove(np.asarray(ids, np.int64))
            self._dirty = True
            return len(ids)

    # ----------------------------------------------------------------- search
    def search(
        self, vectors: np.ndarray, k: int, query_expansion: int = 0
    ) -> list[list[SearchHit]]:
        """Top-``k`` images per query vector (a 1-D vector is one query), best first.

        ``query_expansion`` > 0 re-queries with the average of the query and its top
        ``query_expansion`` results (:func:`~selret.search.expansion.average_query_expansion`).
        """
        with self._lock:
            return search_hits(self._vectors, [self], vectors, k, query_expansion)

    def _hits(self, scores: np.ndarray, ids: np.ndarray, shard: int) -> list[SearchHit]:
        records = self._rows(ids.tolist())
        return [
            SearchHit(int(i), records[i].path, float(s), records[i].metadata, shard)
            for s, i in zip(scores, ids, strict=True)
        ]

    def info(self) -> dict[str, Any]:
        """A summary for humans and the CLI (counts, kinds, encoder, size on disk)."""
        with self._lock:
            state_dir = self.root / self._state
            return {
                "path": str(self.root),
                "state": self._state,
                "format_version": self._manifest["format_version"],
                "count": len(self),
                "dim": self.dim,
                "kind": self._manifest["kind"],
                "index_kind": self._vectors.index_kind,
                "index_params": self._vectors.params,
                "encoder_fingerprint": self.fingerprint,
                "encoder_config": self.encoder_config,
                "unsaved_changes": self._dirty,
                "disk_bytes": sum(f.stat().st_size for f in state_dir.iterdir()),
            }

    def __repr__(self) -> str:
        return f"ImageIndex({str(self.root)!r}, count={len(self)}, kind={self._manifest['kind']!r})"
