"""The conv maps an evaluation run needs: :func:`prepare` extracts (or finds in the feature cache) the
maps of a benchmark's database and queries (cropped by their box) and of its learning set, after
checking that the learning set is held out. One :class:`EvalData` serves any number of methods."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from selret.errors import SelretError
from selret.evaluation.datasets import RetrievalBenchmark
from selret.evaluation.learning import check_disjoint, image_paths, source_name
from selret.features import FeatureMap
from selret.features.extractor import Extractor


class _QueryMaps(Sequence[FeatureMap]):
    """Query maps: a database map when the query is a full database image, else its own entry."""

    def __init__(
        self, db: Sequence[FeatureMap], own: Sequence[FeatureMap], where: list[tuple[bool, int]]
    ):
        self._db, self._own, self._where = db, own, where

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        in_db, j = self._where[i]
        return self._db[j] if in_db else self._own[j]


@dataclass
class EvalData:
    """Conv maps of a benchmark (database, queries) and of its learning set, at one extraction setting.

    ``db`` and ``queries`` align with ``benchmark.db_images`` / ``benchmark.queries``. ``learn`` is
    None without a learning set; ``learn_name`` names it; ``learn_paths`` are its images that
    were extracted. ``extract_seconds`` is the time spent extracting or finding the maps.
    """

    benchmark: RetrievalBenchmark
    weights: str
    layer: str
    max_side: int
    db: Sequence[FeatureMap]
    queries: Sequence[FeatureMap]
    learn: Sequence[FeatureMap] | None = None
    learn_name: str | None = None
    learn_paths: list[Path] = field(default_factory=list)
    learn_failed: list[tuple[str, str]] = field(default_factory=list)
    extract_seconds: float = 0.0


def _require_all(maps, what: str) -> None:
    if maps.report.failed:
        path, reason = maps.report.failed[0]
        raise SelretError(
            f"{len(maps.report.failed)} {what} images could not be used (the benchmark needs all of "
            f"them), e.g. {path}: {reason}"
        )


def _query_sources(benchmark: RetrievalBenchmark) -> tuple[list[tuple[bool, int]], list[int]]:
    """Where each query's map comes from: ``(True, db index)`` for a full-image query that is a
    database image (leave-one-out, UKBench: its map is reused), else ``(False, j)``, the j-th of
    the returned queries that need a map of their own."""
    where: list[tuple[bool, int]] = []
    own: list[int] = []
    for i, q in enumerate(benchmark.queries):
        idx = q.image_index
        if q.bbox is None and idx is not None and q.image == benchmark.db_images[idx]:
            where.append((True, idx))
        else:
            where.append((False, len(own)))
            own.append(i)
    return where, own


def prepare(
    benchmark: RetrievalBenchmark,
    *,
    weights: str = "vgg16-caffe",
    layer: str = "pool5",
    max_side: int = 1024,
    learn: Sequence[str | Path] | None = None,
    learn_name: str | None = None,
    cache_dir: str | Path | None = None,
    backbone=None,
    device: str | None = None,
    preload: bool = False,
    progress: bool = False,
) -> EvalData:
    """Extract (or find in the cache) every conv map a run on ``benchmark`` needs.

    ``learn`` are learning-set images, folders or list files; they must be disjoint from the
    database and query images (:func:`~selret.evaluation.learning.check_disjoint`). Database and
    query images that fail to load are an error (the ground truth needs them); failed learning
    images are skipped and listed in ``learn_failed``. ``preload`` keeps every map in memory (for
    many runs on one set).
    """
    start = time.perf_counter()
    db_paths = [benchmark.image_path(i) for i in range(len(benchmark))]
    queries = benchmark.queries
    learn_paths = image_paths(learn) if learn else []
    if learn:
        if not learn_paths:
            raise ValueError(f"the learning set {[str(s) for s in learn]} holds no image")
        check_disjoint(learn_paths, db_paths + [benchmark.query_path(q) for q in queries])
    extractor = Extractor(
        weights, layer, max_side, cache=cache_dir, backbone=backbone, device=device
    )

    def rotations(images):
        rots = [benchmark.rotation(im) for im in images]
        return rots if any(rots) else None

    db = extractor.maps(db_paths, rotations=rotations(benchmark.db_images), progress=progress)
    _require_all(db, "database")
    where, own = _query_sources(benchmark)
    own_maps = extractor.maps(
        [benchmark.query_path(queries[i]) for i in own],
        bboxes=[queries[i].bbox for i in own],
        rotations=rotations([queries[i].image for i in own]),
        progress=progress,
    )
    _require_all(own_maps, "query")
    learn_maps = extractor.maps(learn_paths, progress=progress) if learn_paths else None

    def kept(maps):
        return list(maps) if preload else maps

    db_seq = kept(db)
    return EvalData(
        benchmark=benchmark,
        weights=weights,
        layer=layer,
        max_side=max_side,
        db=db_seq,
        queries=_QueryMaps(db_seq, kept(own_maps), where),
        learn=kept(learn_maps) if learn_maps is not None else None,
        learn_name=(learn_name or source_name(learn)) if learn else None,
        learn_paths=list(learn_maps.paths) if learn_maps is not None else [],
        learn_failed=list(learn_maps.report.failed) if learn_maps is not None else [],
        extract_seconds=time.perf_counter() - start,
    )


__all__ = ["EvalData", "prepare"]
