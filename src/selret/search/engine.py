"""A search engine on disk: an encoder and the image index it fills, in one directory.

    ENGINE_DIR/
        encoder.npz     the fitted Encoder (config + learned arrays)
        index/          the ImageIndex (vectors, SQLite catalog, manifest naming the encoder)

``SearchEngine`` is what the CLI (``selret index``, ``selret search``), the HTTP server and the demo
use: index image files (incrementally, skipping what is indexed, reporting bad files), and search by
image path, image bytes (optional query box) or vector. Opening checks that the index was built by
this very encoder (fingerprint), so vectors of different encoders never mix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selret.encoding.encoder import Encoder
from selret.features.extractor import Extractor
from selret.features.io import image_size
from selret.search.hits import SearchHit
from selret.search.store import ImageIndex

ENCODER_FILE = "encoder.npz"
INDEX_DIR = "index"


@dataclass
class AddReport:
    """Outcome of ``SearchEngine.add_images``."""

    added: int = 0
    skipped: int = 0  # already indexed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def normalise_path(path: str | os.PathLike) -> str:
    """The key an image file is indexed under: its absolute, resolved path."""
    return str(Path(path).expanduser().resolve())


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
        if (root / ENCODER_FILE).exists() or (root / INDEX_DIR).exists():
            raise FileExistsError(
                f"{root}: already holds a selret index; use `selret index add` or another path"
            )
        root.mkdir(parents=True, exist_ok=True)
        encoder.save(root / ENCODER_FILE)
        index = ImageIndex.create(
            root / INDEX_DIR, encoder.dim, encoder.config.to_dict(), encoder.fingerprint, kind=kind
        )
        return cls(root, encoder, index, cache_dir)

    @classmethod
    def temporary(
        cls, encoder: Encoder, kind: str = "exact", cache_dir: str | Path | None = None
    ) -> SearchEngine:
        """A new engine in a temporary directory, removed when the process exits (one-off
        searches of a folder; the feature cache still keeps the maps)."""
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="selret-engine-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        return cls.create(root, encoder, kind=kind, cache_dir=cache_dir)

    @classmethod
    def open(cls, root: str | Path, cache_dir: str | Path | None = None) -> SearchEngine:
        """Open the engine at ``root``; refuses an index built with another encoder."""
        root = Path(root)
        if not (root / ENCODER_FILE).is_file() or not (root / INDEX_DIR).is_dir():
            raise FileNotFoundError(
                f"{root}: not a selret index (no {ENCODER_FILE} and {INDEX_DIR}/); create one with `selret index build`"
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
        self, paths: Sequence[str | os.PathLike], progress: bool = True, device: str | None = None
    ) -> AddReport:
        """Encode and index the image files not indexed yet; bad files are reported, not fatal."""
        keys = [normalise_path(p) for p in paths]
        todo = self.index.missing(keys)
        report = AddReport(skipped=len(keys) - len(todo))
        if todo:
            maps = self.extractor(device).maps(todo, progress=progress)
            report.failed = [(str(p), r) for p, r in maps.report.failed]
            if len(maps):
                vectors = self.encoder.encode_many(maps, progress=progress)
                # The original size (read from the header), for clients drawing boxes.
                meta = [
                    dict(zip(("height", "width"), image_size(p), strict=True)) for p in maps.paths
                ]
                report.added = len(self.index.add([str(p) for p in maps.paths], vectors, meta))
        self.index.save()
        return report

    def remove_images(self, paths_or_ids: Sequence) -> int:
        items = [i if isinstance(i, int) else normalise_path(i) for i in paths_or_ids]
        n = self.index.remove(items)
        self.index.save()
        return n

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
