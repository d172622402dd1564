"""Glue between images on disk and the encoder: feature maps of a list of images, via the cache.

``FeatureMaps`` is what ``selret fit``, ``encode``, ``eval`` and ``index`` all use: it extracts every
missing map into the feature cache once (resumable, bad images reported and skipped), then reads
maps back lazily, so an encoder can make two passes over a learning set that does not fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from selret.features import FeatureMap
from selret.features.cache import FeatureCache
from selret.features.extract import ExtractionReport, cache_id, extract_to_cache
from selret.files import default_cache_dir


def open_cache(cache_dir: str | Path | None = None) -> FeatureCache:
    return FeatureCache(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())


class FeatureMaps(Sequence[FeatureMap]):
    """The conv maps of ``paths`` as a lazy sequence backed by the feature cache.

    On construction every missing map is extracted with ``backbone`` at ``max_side`` (optional
    per-image ``bboxes`` / ``rotations``). Images that fail are dropped and listed in ``report``;
    ``paths`` holds the ones that succeeded, aligned with the sequence; ``indices`` their positions
    in the input list.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        backbone,
        cache: FeatureCache,
        max_side: int = 1024,
        bboxes: Sequence | None = None,
        rotations: Sequence | None = None,
        batch_size: int = 8,
        progress: bool = True,
        log_path: str | Path | None = None,
    ):
        paths = [Path(p) for p in paths]
        self.cache = cache
        self.report: ExtractionReport = extract_to_cache(
            paths, backbone, cache, max_side=max_side, batch_size=batch_size,
            bboxes=bboxes, rotations=rotations, progress=progress, log_path=log_path,
        )  # fmt: skip
        failed = {str(p) for p, _ in self.report.failed}
        bid = cache_id(backbone)
        self.paths: list[Path] = []
        self.indices: list[int] = []
        self._keys: list[str] = []
        for i, p in enumerate(paths):
            if str(p) in failed:
                continue
            key = cache.key(
                p, bid, max_side,
                bbox=None if bboxes is None else bboxes[i],
                rotation=0 if rotations is None else (rotations[i] or 0),
            )  # fmt: skip
            if key in cache:
                self.paths.append(p)
                self.indices.append(i)
                self._keys.append(key)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        fmap = self.cache.get(self._keys[i])
        if fmap is None:
            raise KeyError(f"{self.paths[i]}: feature map missing from the cache {self.cache.root}")
        return fmap


def feature_maps_for(
    paths: Sequence[str | Path],
    config,
    cache_dir: str | Path | None = None,
    backbone=None,
    bboxes: Sequence | None = None,
    rotations: Sequence | None = None,
    progress: bool = True,
    log_path: str | Path | None = None,
    device: str | None = None,
) -> FeatureMaps:
    """``FeatureMaps`` of ``paths`` with the backbone, layer and image size of an EncoderConfig."""
    if backbone is None:
        from selret.features.backbones import load_backbone

        backbone = load_backbone(config.weights, config.layer, device=device)
    return FeatureMaps(
        paths, backbone, open_cache(cache_dir), max_side=config.max_side,
        bboxes=bboxes, rotations=rotations, progress=progress, log_path=log_path,
    )  # fmt: skip
