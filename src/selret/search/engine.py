"""A search engine on disk: an encoder and the image index it fills, in one directory.

    ENGINE_DIR/
        encoder.npz     the fitted Encoder (config + learned arrays)
        index/          the ImageIndex (vectors, SQLite catalog, manifest naming the encoder)

``SearchEngine`` is what the CLI (``selret index``, ``selret search``), the HTTP server and the demo
use: build an engine all or nothing, keep it in step with image files by content (sha256: new files
added, changed ones re-encoded, deleted ones dropped by a sync, bad files reported), and search by
image path, image bytes (optional query box) or vector. Opening checks that the index was built by
this very encoder (fingerprint), so vectors of different encoders never mix.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selret.encoding.encoder import Encoder
from selret.errors import ImageError, IndexExistsError, NoImagesError, NotAnIndexError
from selret.features.extractor import Extractor
from selret.features.io import image_size
from selret.files import crash_point, file_digest, file_stamp
from selret.search import storage
from selret.search.hits import SearchHit
from selret.search.store import FILE_STAMP, ImageIndex

ENCODER_FILE = "encoder.npz"
INDEX_DIR = "index"


@dataclass
class AddReport:
    """Outcome of ``SearchEngine.add_images`` / ``sync_images``."""

    added: int = 0
    skipped: int = 0  # already indexed with the same content (sha256)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    updated: int = 0  # indexed, content changed (or no sha256 recorded): re-encoded
    removed: int = 0  # files gone (sync), or changed files that no longer decode
    hashed: int = 0  # files read to hash them (the others' stamps were unchanged)

    def summary(self) -> str:
        return (
            f"added {self.added}, updated {self.updated}, unchanged {self.skipped}, "
            f"removed {self.removed}, failed {len(self.failed)}"
        )


def normalise_path(path: str | os.PathLike) -> str:
    """The key an image file is indexed under: its absolute, resolved path."""
    return str(Path(path).expanduser().resolve())


def holds_engine(root: Path) -> bool:
    return (root / ENCODER_FILE).exists() or (root / INDEX_DIR).exists()


class SearchEngine:
    """An ``Encoder`` plus the ``ImageIndex`` of its vectors, stored together under ``root``."""

    def __init__(
        self, root: Path, encoder: Encoder, index: ImageIndex, cache_dir: str | Path | None = None
    ):
        self.root = root
        self.encoder = encoder
        self.index = index
        self.cache_dir = cache_dir
        self._extractor: Extractor | None = None

    def extractor(self, device: str | None = None) -> Extractor:
        """The extractor of the encoder's backbone and image size (loaded once, on first use)."""
        if self._extractor is None:
            self._extractor = Extractor.for_config(
                self.encoder.config,
                cache=self.cache_dir,
                device=device,
                keypoints=self.encoder.config.mask == "sift",  # SIFT costs as much as a query
            )
        return self._extractor

    @classmethod
    def create(
        cls,
        root: str | Path,
        encoder: Encoder,
        kind: str = "exact",
        cache_dir: str | Path | None = None,
    ) -> SearchEngine:
        """A new, empty engine at ``root`` (must not hold an engine already)."""
        root = Path(root)
        if holds_engine(root):
            raise IndexExistsError(f"{root}: already holds a selret index")
        root.mkdir(parents=True, exist_ok=True)
        encoder.save(root / ENCODER_FILE)
        index = ImageIndex.create(
            root / INDEX_DIR, encoder.dim, encoder.config.to_dict(), encoder.fingerprint, kind=kind
        )
        return cls(root, encoder, index, cache_dir)

    @classmethod
    def build(
        cls,
        root: str | Path,
        encoder: Encoder,
        paths: Sequence[str | os.PathLike],
        kind: str = "exact",
        cache_dir: str | Path | None = None,
        force: bool = False,
        progress: bool = True,
        device: str | None = None,
    ) -> tuple[SearchEngine, AddReport]:
        """A new engine at ``root`` holding ``paths``, all or nothing.

        Built in a temporary folder next to ``root`` (``.NAME.building-PID``) and renamed to
        ``root`` at the end: a failed, killed or empty build leaves no engine behind. Raises
        :class:`~selret.errors.NoImagesError` (with the failures in ``.failed``) when no image
        could be indexed, :class:`~selret.errors.IndexExistsError` when ``root`` holds an
        engine (unless ``force``: then it is replaced once the new one is complete) or other
        files.
        """
        root = Path(root).expanduser().absolute()
        check_build_target(root, force)
        root.parent.mkdir(parents=True, exist_ok=True)
        _clear_dead_builds(root)
        tmp = root.parent / f".{root.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            engine = cls.create(tmp, encoder, kind=kind, cache_dir=cache_dir)
            report = engine.add_images(paths, progress=progress, device=device)
            if report.added == 0:
                err = NoImagesError(
                    root, f"no image could be indexed ({len(report.failed)} failed)"
                )
                err.failed = report.failed
                raise err
            _publish(tmp, root, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(root, cache_dir=cache_dir), report

    @classmethod
    def temporary(
        cls, encoder: Encoder, kind: str = "exact", cache_dir: str | Path | None = None
    ) -> SearchEngine:
        """A new engine in a temporary directory, removed when the process exits (one-off
        searches of a folder; the feature cache still keeps the maps)."""
        import atexit
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="selret-engine-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        return cls.create(root, encoder, kind=kind, cache_dir=cache_dir)

    @classmethod
    def open(cls, root: str | Path, cache_dir: str | Path | None = None) -> SearchEngine:
        """Open the engine at ``root``; refuses an index built with another encoder."""
        root = Path(root)
        if not (root / ENCODER_FILE).is_file() or not (root / INDEX_DIR).is_dir():
            raise NotAnIndexError(
                f"{root}: not a selret index (no {ENCODER_FILE} and {INDEX_DIR}/)"
            )
        encoder = Encoder.load(root / ENCODER_FILE)
        index = ImageIndex.open(
            root / INDEX_DIR,
            expected_fingerprint=encoder.fingerprint,
            expected_config=encoder.config.to_dict(),
        )
        return cls(root, encoder, index, cache_dir)

    # ------------------------------------------------------------------ indexing

    def add_images(
        self,
        paths: Sequence[str | os.PathLike],
        progress: bool = True,
        device: str | None = None,
        lock_timeout: float | None = None,
        on_wait: Callable[[str], object] | None = None,
        rehash: bool = False,
    ) -> AddReport:
        """Encode and index image files that are new or whose content (sha256) changed.

        Unchanged files are skipped; changed ones are re-encoded and replace their old entry
        (under a new id); a changed file that no longer decodes loses its stale entry. Bad files
        are reported, not fatal. Encoding happens first, then the changes are merged into the
        live index under the writer lock (``lock_timeout``, ``on_wait``: see
        :meth:`ImageIndex.updating`), so a concurrent writer neither fails this one nor loses
        its own work.

        An indexed file whose stamp (size, mtime in ns, inode: ``selret.files.file_stamp``) is
        the one recorded when it was hashed is taken as unchanged without being read, as rsync
        and make do; ``rehash`` reads and hashes every file regardless (for a file rewritten
        within one mtime tick at the same size, or a file system whose mtimes cannot be
        trusted). ``selret.search.verify.verify_engine`` always hashes.
        """
        return self._update(paths, None, False, progress, device, lock_timeout, on_wait, rehash)

    def sync_images(
        self,
        paths: Sequence[str | os.PathLike],
        folder: str | os.PathLike | None = None,
        progress: bool = True,
        device: str | None = None,
        lock_timeout: float | None = None,
        on_wait: Callable[[str], object] | None = None,
        rehash: bool = False,
    ) -> AddReport:
        """:meth:`add_images`, and remove the entries of files that are gone: indexed images
        under ``folder`` that are not among ``paths``, and those of ``paths`` whose file no
        longer exists. Entries outside ``folder`` and not in ``paths`` are left alone."""
        if not paths:
            raise NoImagesError(folder, "no images found; nothing to sync the index with")
        return self._update(paths, folder, True, progress, device, lock_timeout, on_wait, rehash)

    def _update(
        self, paths, folder, prune, progress, device, lock_timeout, on_wait, rehash
    ) -> AddReport:
        keys = list(dict.fromkeys(normalise_path(p) for p in paths))
        recorded = self.index.file_records(keys)
        report, digests, stamps, todo, gone = AddReport(), {}, {}, [], []
        restamp = {}  # unchanged content under a new stamp: recorded if the index is saved
        for key in keys:
            old = recorded.get(key)
            try:
                # The stamp is taken before the hash: a file changed after it gets a new
                # stamp, so the next run reads it again.
                stamps[key] = file_stamp(key)
                if not rehash and old and old.sha256 and old.stamp == stamps[key]:
                    report.skipped += 1
                    continue
                digests[key] = file_digest(key, fresh=rehash)
                report.hashed += 1
            except ImageError:
                if prune and not os.path.exists(key):
                    gone.append(key)
                    continue
                digests[key] = None  # unreadable: the extractor reports why
            if old is not None and old.sha256 is not None and old.sha256 == digests[key]:
                report.skipped += 1
                restamp[key] = stamps[key]
            else:
                todo.append(key)
        if folder is not None and prune:
            under, listed = normalise_path(folder) + os.sep, set(keys)
            gone += [
                p for _, p, _ in self.index.entries() if p.startswith(under) and p not in listed
            ]
        paths_done, vectors, meta = self._encode(todo, digests, stamps, report, progress, device)
        # A changed file that no longer decodes: its old vector describes content that is gone.
        failed = {p for p, _ in report.failed}
        stale = [p for p in todo if p in failed and digests[p] is not None and p in recorded]
        crash_point("index.encoded")
        with self.index.updating(lock_timeout, on_wait):
            self._merge(paths_done, vectors, meta, report)
            # Only entries whose file is really gone (checked now, under the lock) are dropped.
            report.removed += self.index.remove(stale + [p for p in gone if not os.path.exists(p)])
            if restamp and self.index.dirty:  # never a save (a copy of every vector) for this alone
                self.index.set_file_stamps(restamp)
        return report

    def _encode(self, todo, digests, stamps, report, progress, device):
        """(paths, vectors, metadata) of the files of ``todo`` that encode; failures go to
        ``report``."""
        if not todo:
            return [], None, []
        maps = self.extractor(device).maps(todo, progress=progress)
        report.failed += [(str(p), r) for p, r in maps.report.failed]
        if not len(maps):
            return [], None, []
        vectors = self.encoder.encode_many(maps, progress=progress)
        paths, rows, meta = [], [], []
        for i, p in enumerate(maps.paths):
            try:  # the original size (read from the header), for clients drawing boxes
                height, width = image_size(p)
            except ImageError as exc:  # replaced or removed since it was encoded
                report.failed.append((str(p), f"{type(exc).__name__}: {exc.reason}"))
                continue
            paths.append(str(p))
            rows.append(i)
            meta.append(
                {
                    "height": height,
                    "width": width,
                    "sha256": digests.get(str(p)),
                    FILE_STAMP: stamps.get(str(p)),
                }
            )
        return paths, vectors[rows], meta

    def _merge(self, paths, vectors, meta, report) -> None:
        """Add the encoded files to the live index (the writer lock is held): what another
        writer indexed meanwhile with the same content is not indexed twice."""
        live = self.index.sha256s(paths)
        keep = []
        for i, (path, m) in enumerate(zip(paths, meta, strict=True)):
            if path not in live:
                report.added += 1
            elif live[path] is not None and live[path] == m["sha256"]:
                report.skipped += 1
                continue
            else:
                report.updated += 1
            keep.append(i)
        if keep:
            self.index.add(
                [paths[i] for i in keep], vectors[keep], [meta[i] for i in keep], replace=True
            )

    def remove_images(
        self, paths_or_ids: Sequence, lock_timeout: float | None = None, on_wait=None
    ) -> int:
        items = [i if isinstance(i, int) else normalise_path(i) for i in paths_or_ids]
        with self.index.updating(lock_timeout, on_wait):
            return self.index.remove(items)

    # ------------------------------------------------------------------ searching

    def search_vector(
        self, vector: np.ndarray, k: int = 10, query_expansion: int = 0
    ) -> list[SearchHit]:
        return self.index.search(
            np.asarray(vector, np.float32)[None], k, query_expansion=query_expansion
        )[0]

    def search_image(
        self,
        source: str | os.PathLike | bytes,
        k: int = 10,
        bbox: Sequence[float] | None = None,
        query_expansion: int = 0,
        name: str | None = None,
    ) -> list[SearchHit]:
        """Top-``k`` indexed images for a query image file or its bytes (``bbox`` crops the query)."""
        fmap = self.extractor().feature_map(source, bbox=bbox, name=name)
        vector = self.encoder.encode(fmap)
        return self.search_vector(vector, k, query_expansion)

    def info(self) -> dict:
        info = self.index.info()
        info["encoder"] = repr(self.encoder)
        info["engine_path"] = str(self.root)
        return info


# ---------------------------------------------------------------------- building helpers


def check_build_target(root: Path, force: bool) -> None:
    """Refuse (IndexExistsError) a build target that holds an engine (unless ``force``) or
    other files."""
    if holds_engine(root):
        if not force:
            raise IndexExistsError(f"{root}: already holds a selret index")
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise IndexExistsError(
            f"{root}: exists and is neither empty nor a selret index",
            hint="build into a new or empty folder",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_dead_builds(root: Path) -> None:
    """Remove what killed builds of ``root`` left next to it (their process is gone)."""
    prefix = f".{root.name}."
    for leftover in root.parent.iterdir():
        if not leftover.name.startswith(prefix):
            continue
        kind, _, pid = leftover.name[len(prefix) :].rpartition("-")
        if kind in ("building", "replaced") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _publish(tmp: Path, root: Path, force: bool) -> None:
    """Rename the finished build ``tmp`` to ``root`` (replacing the engine there with ``force``,
    under its writer lock, so that no save of another writer is cut in half)."""
    if not force or not holds_engine(root):
        try:
            os.rename(tmp, root)  # onto an empty folder too; fails if one appeared meanwhile
        except OSError as exc:
            raise IndexExistsError(f"{root}: created by another process during this build") from exc
        return
    old = root.parent / f".{root.name}.replaced-{os.getpid()}"
    lock_dir = root / INDEX_DIR if (root / INDEX_DIR).is_dir() else root
    with storage.writer_lock(lock_dir):
        os.rename(root, old)
        os.rename(tmp, root)
    shutil.rmtree(old, ignore_errors=True)
