"""The persistent image index: :class:`ImageIndex`, a directory pairing a
:class:`~selret.search.vectors.VectorIndex` with a SQLite catalog of the indexed images (path, the
sha256 of the file's bytes, size, metadata) and a manifest naming the encoder that made the vectors.

Saves are atomic (a new state directory, then one atomic switch of ``CURRENT``); writer processes
are serialised by a lock file; opening checks the encoder fingerprint. The files themselves are
:mod:`selret.search.storage`'s. SPEC section 8.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selret.errors import (
    ConfigMismatchError,
    CorruptIndexError,
    IndexConflictError,
    IndexExistsError,
)
from selret.files import crash_point
from selret.search import storage
from selret.search.hits import SearchHit, search_hits
from selret.search.storage import FILE_STAMP, FORMAT_VERSION, FileRecord, ImageRecord, chunks
from selret.search.vectors import VectorIndex, as_matrix

__all__ = ["FILE_STAMP", "FORMAT_VERSION", "FileRecord", "ImageIndex", "ImageRecord"]


class ImageIndex:
    """A persistent image index: vectors, a catalog of the images, and the encoder that made them.

    On disk, a directory::

        CURRENT                 names the live state directory (replaced atomically)
        LOCK                    serialises writer processes (holds the last writer's pid)
        state-000007/
            manifest.json       format_version, encoder_config, encoder_fingerprint, dim,
                                kind, index_kind, index_params, count
            catalog.sqlite      table images(id, path, content_sha1, width, height,
                                             added_at, metadata JSON, sha256)
            vectors.faiss       the VectorIndex, ids = catalog ids (absent while an IVF-PQ
                                index is empty and untrained)

    Changes live in memory until :meth:`save`, which writes a whole new state directory, then
    switches ``CURRENT`` to it with one ``os.replace`` and deletes the old one: a crash at any
    point leaves the previous state openable, its catalog and vectors in agreement (what a crash
    leaves behind is never read, and removed by the next save).

    Writers: :meth:`updating` takes the writer lock (waiting for another writer, with a
    timeout), first catches up with what other writers saved since this handle was opened, and
    saves on the way out -- so concurrent writers merge instead of failing. A bare :meth:`save`
    refuses (:class:`IndexConflictError`) if another handle saved in between.

    Images are keyed by their path string exactly as given (pass normalised paths). Catalog ids
    are assigned from 1 up, never reused, and unchanged by removals; a replaced image gets a new
    id. Create with :meth:`create`, reopen with :meth:`open`. A handle is safe to share between
    threads (calls are serialised).
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
            raise IndexExistsError(f"{root}: exists and is not an empty directory")
        vectors = VectorIndex(dim, kind, **index_params)
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder_config": json.loads(json.dumps(encoder_config)),
            "encoder_fingerprint": str(fingerprint),
            "dim": int(dim),
            "kind": kind,
            "index_params": vectors.params,
        }
        root.mkdir(parents=True, exist_ok=True)
        created = cls(root, storage.state_name(0), manifest, storage.new_catalog(), vectors)
        with storage.writer_lock(root):
            created._write_state(first=True)
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
        its catalog and vectors disagree, :class:`~selret.errors.NotAnIndexError` when ``path``
        holds no index.
        """
        root = Path(path)
        for _ in range(5):  # a writer may delete the state we picked while we read it: retry
            state = storage.read_current(root)
            try:
                manifest, db, vectors = storage.load_state(root / state)
                break
            except (FileNotFoundError, CorruptIndexError):
                if storage.read_current(root) == state:
                    raise
        else:  # pragma: no cover - five concurrent saves in a row
            raise IndexConflictError(f"{root}: the index kept changing while being opened")
        _check_fingerprint(root, manifest, expected_fingerprint, expected_config)
        return cls(root, state, manifest, db, vectors)

    # ----------------------------------------------------------------- saving
    def save(self, lock_timeout: float | None = None) -> None:
        """Commit the in-memory state to disk atomically (see the class docstring).

        Refuses (:class:`IndexConflictError`) when another writer saved since this handle was
        opened or last saved; :meth:`updating` merges instead.
        """
        with self._lock, storage.writer_lock(self.root, lock_timeout):
            on_disk = storage.read_current(self.root)
            if on_disk != self._state:
                raise IndexConflictError(
                    f"{self.root}: saved by another writer ({on_disk}) since this handle "
                    f"opened {self._state}; reopen it and redo the change"
                )
            self._write_state(first=False)

    @contextlib.contextmanager
    def updating(
        self,
        lock_timeout: float | None = None,
        on_wait: Callable[[str], object] | None = None,
    ) -> Iterator[ImageIndex]:
        """Change the index under the writer lock, and save.

        On entry, wait for the lock (``on_wait(holder)`` is called once if another writer
        holds it; :class:`~selret.errors.IndexLockTimeout` after ``lock_timeout`` seconds), then
        catch up with what other writers saved since this handle read the index; on a normal
        exit, save. Make the changes inside the block: they apply to the latest state, so no
        other writer's work is lost and none of this one's is thrown away.
        """
        with self._lock, storage.writer_lock(self.root, lock_timeout, on_wait):
            self._catch_up()
            storage.clear_leftovers(
                self.root, self._state
            )  # of interrupted saves, even if no change
            yield self
            if self._dirty:
                self._write_state(first=False)

    def _catch_up(self) -> None:
        """Reload the live state if another writer saved it (the writer lock is held)."""
        on_disk = storage.read_current(self.root)
        if on_disk == self._state:
            return
        if self._dirty:
            raise IndexConflictError(
                f"{self.root}: saved by another writer ({on_disk}) while this handle has unsaved "
                "changes; save them first or reopen the index"
            )
        manifest, db, vectors = storage.load_state(self.root / on_disk)
        _check_fingerprint(self.root, manifest, self.fingerprint, self.encoder_config)
        self._state, self._manifest, self._db, self._vectors = on_disk, manifest, db, vectors

    def _write_state(self, first: bool) -> None:
        """Write the in-memory state as a new state directory and switch ``CURRENT`` to it
        (the writer lock is held)."""
        old = None if first else self._state
        # Leftovers of crashed saves are never live: clear them so the new name is free.
        storage.clear_leftovers(self.root, old)
        new = storage.state_name(0 if first else storage.state_number(old) + 1)
        state_dir = self.root / new
        state_dir.mkdir()
        manifest = {
            **self._manifest,
            "format_version": FORMAT_VERSION,
            "index_kind": self._vectors.index_kind,
            "index_params": self._vectors.params,
            "count": len(self),
        }
        if self._vectors.is_trained:
            storage.write_vectors(self._vectors, state_dir / storage.VECTORS)
        storage.write_catalog(self._db, state_dir / storage.CATALOG)
        storage.write_manifest(manifest, state_dir / storage.MANIFEST)
        crash_point("index.state_written")
        storage.commit_pointer(self.root, new)
        self._state, self._manifest, self._dirty = new, manifest, False
        crash_point("index.committed")
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

    @property
    def state(self) -> str:
        """The name of the state directory this handle holds."""
        return self._state

    @property
    def dirty(self) -> bool:
        """Whether this handle holds changes not saved yet."""
        return self._dirty

    def _ids_of_paths(self, paths: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in chunks(paths):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT path, id FROM images WHERE path IN ({marks})", chunk)
            found.update(rows)
        return found

    def _rows(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        records: dict[int, ImageRecord] = {}
        for chunk in chunks(ids):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {storage.COLUMNS} FROM images WHERE id IN ({marks})"
            for row in self._db.execute(sql, chunk):
                records[row[0]] = storage.image_record(row)
        return records

    def missing(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """The paths (as strings, first occurrences, in order) that are not indexed yet."""
        wanted = list(dict.fromkeys(os.fspath(p) for p in paths))
        with self._lock:
            present = self._ids_of_paths(wanted)
        return [p for p in wanted if p not in present]

    def sha256s(self, paths: Iterable[str | os.PathLike]) -> dict[str, str | None]:
        """{path: recorded sha256 (None if unknown)} for those of ``paths`` that are indexed."""
        return {path: record.sha256 for path, record in self.file_records(paths).items()}

    def file_records(self, paths: Iterable[str | os.PathLike]) -> dict[str, FileRecord]:
        """{path: (recorded sha256, recorded file stamp)} for those of ``paths`` that are indexed;
        either may be None (unknown: indexed before selret recorded it)."""
        wanted = list(dict.fromkeys(os.fspath(p) for p in paths))
        found: dict[str, FileRecord] = {}
        with self._lock:
            for chunk in chunks(wanted):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT path, sha256, metadata FROM images WHERE path IN ({marks})"
                for path, sha256, metadata in self._db.execute(sql, chunk):
                    found[path] = FileRecord(sha256, json.loads(metadata).get(FILE_STAMP))
        return found

    def set_file_stamps(self, stamps: dict[str, list[int]]) -> int:
        """Record new file stamps of indexed paths whose content was found unchanged (touched,
        copied back); saved with the next save. Returns how many rows changed."""
        changed = 0
        with self._lock, self._db:
            for chunk in chunks(list(stamps)):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT id, path, metadata FROM images WHERE path IN ({marks})"
                for id_, path, metadata in list(self._db.execute(sql, chunk)):
                    extra = json.loads(metadata)
                    if extra.get(FILE_STAMP) != stamps[path]:
                        extra[FILE_STAMP] = stamps[path]
                        sql = "UPDATE images SET metadata = ? WHERE id = ?"
                        self._db.execute(sql, (json.dumps(extra), id_))
                        changed += 1
            self._dirty = self._dirty or changed > 0
        return changed

    def entries(self) -> list[tuple[int, str, str | None]]:
        """Every catalog row as (id, path, sha256), by id."""
        with self._lock:
            return list(self._db.execute("SELECT id, path, sha256 FROM images ORDER BY id"))

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
        replace: bool = False,
    ) -> list[int]:
        """Index images. Returns the new ids, in the order of the added paths.

        ``vectors`` is (len(paths), D). Rows of paths already indexed are skipped, so re-adding
        a folder is cheap (:meth:`missing` tells which paths to encode at all) -- unless
        ``replace``: then their old entries are removed and the new vectors added under new
        ids (a file whose content changed). A path repeated in ``paths`` is added once.
        ``metadata`` dicts are stored as JSON; their keys ``sha256``, ``content_sha1``,
        ``width`` and ``height`` fill the catalog columns of those names.
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
            indexed = self._ids_of_paths(keys)
            rows, keep, seen = [], [], set()
            for i, (key, meta) in enumerate(zip(keys, metas, strict=True)):
                if key in seen or (key in indexed and not replace):
                    continue
                seen.add(key)  # a path repeated in this batch is added once
                rows.append(storage.catalog_row(key, meta, added_at))
                keep.append(i)
            if not rows:
                return []
            old = sorted(indexed[k] for k in seen if k in indexed)
            with self._db:  # one transaction: rolled back if the vectors cannot be changed
                self._delete_rows(old)
                ids = [self._db.execute(storage.INSERT, row).lastrowid for row in rows]
                self._vectors.add(x[keep], np.asarray(ids, np.int64))
                try:
                    if old:
                        self._vectors.remove(np.asarray(old, np.int64))
                except BaseException:
                    self._vectors.remove(np.asarray(ids, np.int64))
                    raise
            self._dirty = True
            return ids

    def _delete_rows(self, ids: Sequence[int]) -> None:
        for chunk in chunks(ids):
            marks = ",".join("?" * len(chunk))
            self._db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)

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
                self._delete_rows(ids)
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


def _check_fingerprint(
    root: Path, manifest: dict, expected: str | None, expected_config: dict | None
) -> None:
    stored = manifest["encoder_fingerprint"]
    if expected is None or expected == stored:
        return
    detail = (
        "differing settings: "
        + storage.config_differences(manifest["encoder_config"], expected_config)
        if expected_config is not None
        else f"index encoder config: {json.dumps(manifest['encoder_config'], sort_keys=True)}"
    )
    raise ConfigMismatchError(
        f"{root}: index was built with encoder fingerprint {stored!r}, but the encoder "
        f"in use has fingerprint {expected!r}; {detail}",
        hint="rebuild the index with this encoder (`selret index build ... --force`) or use "
        "the encoder it was built with",
    )
