"""Shards -> searchable indexes: :func:`ingest_shards` (all shards into one index or engine) and
:func:`shard_indexes` (one index per shard, for :class:`~selret.search.sharded.ShardedSearch`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from selret.distributed.shards import (
    _SHARD_PREFIX,
    Shard,
    _check_fingerprint,
    list_shards,
    load_shard,
    read_failures,
)
from selret.encoding.encoder import Encoder
from selret.search.engine import ENCODER_FILE, INDEX_DIR, SearchEngine
from selret.search.store import ImageIndex

__all__ = ["IngestReport", "ingest_shards", "shard_indexes"]


@dataclass
class IngestReport:
    """Outcome of :func:`ingest_shards`: ``added`` new images, ``skipped`` ones already indexed,
    ``failures`` of the encoding run (see :func:`read_failures`)."""

    index_path: Path
    shards: int = 0
    added: int = 0
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)


def _open_target(
    target: str | os.PathLike | ImageIndex | SearchEngine,
    first_shard: Shard,
    encoder_path: str | os.PathLike | None,
    kind: str,
) -> ImageIndex:
    """The ImageIndex to ingest into: given, of an engine, opened, or created when absent."""
    if isinstance(target, SearchEngine):
        return target.index
    if isinstance(target, ImageIndex):
        return target
    root = Path(target)
    if (root / ENCODER_FILE).is_file() and (root / INDEX_DIR).is_dir():
        return SearchEngine.open(root).index
    if root.is_dir() and any(root.iterdir()):
        return ImageIndex.open(root)
    if encoder_path is not None:  # a new engine, servable by `selret serve` / `selret search`
        return SearchEngine.create(root, Encoder.load(encoder_path), kind=kind).index
    return ImageIndex.create(
        root,
        first_shard.vectors.shape[1],
        first_shard.encoder_config,
        first_shard.fingerprint,
        kind=kind,
    )


def ingest_shards(
    shard_dir: str | os.PathLike,
    target: str | os.PathLike | ImageIndex | SearchEngine,
    encoder_path: str | os.PathLike | None = None,
    kind: str = "exact",
) -> IngestReport:
    """Add every shard of ``shard_dir`` to one index, and save it.

    ``target``: an :class:`ImageIndex` or :class:`SearchEngine`, or a directory holding either
    (an engine directory has ``encoder.npz`` and ``index/``). A missing or empty directory
    becomes a new engine with the encoder at ``encoder_path`` when given, else a bare
    ImageIndex of kind ``kind``. Every shard must come from the index's encoder (checked before
    anything is added: ConfigMismatchError). Images already indexed are skipped, so ingesting
    again after a resumed encoding run adds only the new shards' images.
    """
    shard_files = list_shards(shard_dir)
    if not shard_files:
        raise FileNotFoundError(f"{shard_dir}: no {_SHARD_PREFIX}*.npz shards")
    index = _open_target(target, load_shard(shard_files[0]), encoder_path, kind)
    for shard_file in shard_files:
        _check_fingerprint(shard_file, index.fingerprint, f"the index {index.root}")
    report = IngestReport(index_path=index.root, shards=len(shard_files))
    for shard_file in shard_files:
        shard = load_shard(shard_file)
        added = index.add(shard.paths, shard.vectors, shard.metadata())
        report.added += len(added)
        report.skipped += len(shard.paths) - len(added)
    index.save()
    report.failures = read_failures(shard_dir)
    return report


def shard_indexes(
    shard_dir: str | os.PathLike, index_root: str | os.PathLike, kind: str = "exact"
) -> list[ImageIndex]:
    """One :class:`ImageIndex` per non-empty shard, at ``index_root/<shard name>``.

    Existing shard indexes are reopened (and completed if a shard grew), so this is cheap to
    call again. Search them together with ``ShardedSearch(shard_indexes(...))``: with exact
    indexes it returns the same top-k as one index holding every vector.
    """
    root = Path(index_root)
    indexes = []
    for shard_file in list_shards(shard_dir):
        shard = load_shard(shard_file)
        if not shard.paths:
            continue
        where = root / shard.name
        if where.exists():
            index = ImageIndex.open(where, expected_fingerprint=shard.fingerprint)
        else:
            index = ImageIndex.create(
                where, shard.vectors.shape[1], shard.encoder_config, shard.fingerprint, kind=kind
            )
        if index.add(shard.paths, shard.vectors, shard.metadata()):
            index.save()
        indexes.append(index)
    return indexes
