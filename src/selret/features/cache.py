"""On-disk cache of :class:`~selret.features.FeatureMap` records: one file per image, atomic writes.

Layout under ``root``::

    root/<config>/manifest.json         what produced the maps (backbone id, layer, max_side)
    root/<config>/<ab>/<image>.npz      one FeatureMap: features, image_size, keypoints

``<config>`` hashes the extraction configuration (backbone id, max_side, cache format), ``<image>``
hashes the image file's *content* (sha256 of its bytes), crop box and rotation: editing or replacing
a file changes its key, so it is re-extracted instead of served stale, while copying, moving or
touching a data set (a fresh checkout, a new machine) keeps every entry valid. A key is the string
``"<config>-<image>"``.

Writes go to a temporary file in the entry's directory, are flushed and fsynced, then renamed over
the entry with :func:`os.replace`, so a reader (or a crash) sees the old entry or the new one, never
a partial file, and several processes may fill one cache with different keys at once. Left-over
temporary files (``.*.part``) from a killed writer are ignored.

A corrupt or unreadable entry is treated as missing: :meth:`FeatureCache.get` logs a warning and
returns None, so the image is extracted again and the entry overwritten.

An entry may carry a ``damage`` note: the image's data was damaged (corrupt JPEG data, trailing
garbage, NaN pixels) and was accepted anyway (``selret extract --accept-damaged``), so that a later
strict run refuses it instead of serving its map as if the file were fine.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from selret.errors import CacheError
from selret.features import FeatureMap
from selret.files import atomic_write, crash_point, file_digest

__all__ = ["CACHE_FORMAT", "FeatureCache"]

logger = logging.getLogger(__name__)

#: Version of the entry layout; part of the config hash, so a format change starts a fresh cache.
#: 2: image keys hash the file's content instead of its path and mtime.
CACHE_FORMAT = 2

_KEY = re.compile(r"^([0-9a-f]{12})-([0-9a-f]{32})$")
_STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def _digest(obj: object, n: int) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


class FeatureCache:
    """A directory of FeatureMap records, keyed by image file and extraction configuration.

    ``storage`` is the dtype features are stored in: ``"float32"`` (exact) or ``"float16"`` (half
    the disk, about 3 significant digits). :meth:`get` always returns float32.
    """

    def __init__(self, root: str | Path, storage: str = "float32"):
        if storage not in _STORAGE_DTYPES:
            raise ValueError(
                f"storage must be one of {', '.join(_STORAGE_DTYPES)}, got {storage!r}"
            )
        self.root = Path(root).expanduser()
        self.storage = storage
        # Config descriptions seen by key(), written to the manifest on the first put().
        self._configs: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}, storage={self.storage!r})"

    # ------------------------------------------------------------------ keys

    def key(
        self,
        path: str | Path,
        backbone_id: str,
        max_side: int,
        bbox: Sequence[float] | None = None,
        rotation: int = 0,
        draft: bool = False,
    ) -> str:
        """The cache key of image file ``path`` extracted with ``backbone_id`` at ``max_side``.

        Depends on the file's content (not its path or mtime), ``bbox``, ``rotation`` and ``draft``
        (a JPEG decoded at reduced scale gives slightly different pixels; the keys of full decodes
        are those of caches made before draft decoding existed).
        Raises ImageNotFoundError when ``path`` cannot be read.
        """
        content = file_digest(path)
        config = {
            "format": CACHE_FORMAT,
            "backbone_id": str(backbone_id),
            "max_side": int(max_side),
        }
        config_hash = _digest(config, 12)
        self._configs.setdefault(config_hash, config)
        image = {
            "sha256": content,
            "bbox": None if bbox is None else [float(v) for v in bbox],
            "rotation": int(rotation),
        }
        if draft:
            image["draft"] = True
        return f"{config_hash}-{_digest(image, 32)}"

    def entry_path(self, key: str) -> Path:
        """The file that holds (or would hold) entry ``key``."""
        m = _KEY.match(key)
        if not m:
            raise ValueError(f"not a FeatureCache key: {key!r}")
        config_hash, image_hash = m.groups()
        return self.root / config_hash / image_hash[:2] / f"{image_hash}.npz"

    # ------------------------------------------------------------------ mapping interface

    def __contains__(self, key: object) -> bool:
        return (
            isinstance(key, str) and _KEY.match(key) is not None and self.entry_path(key).is_file()
        )

    def __len__(self) -> int:
        return sum(1 for _ in self._entry_files())

    def _entry_files(self) -> Iterator[Path]:
        if self.root.is_dir():
            yield from self.root.glob("*/??/*.npz")

    def get(self, key: str) -> FeatureMap | None:
        """The FeatureMap stored under ``key``; None when absent, corrupt or unreadable (logged)."""
        entry = self.get_entry(key)
        return None if entry is None else entry[0]

    def get_entry(self, key: str) -> tuple[FeatureMap, str | None] | None:
        """``(FeatureMap, damage note or None)`` stored under ``key``; None when absent, corrupt or
        unreadable (logged)."""
        path = self.entry_path(key)
        try:
            return self._read(path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # any failure to parse the entry: re-extract rather than crash
            logger.warning(
                "%s: unreadable cache entry treated as missing (%s: %s)",
                path,
                type(exc).__name__,
                exc,
            )
            return None

    @staticmethod
    def _read(path: Path) -> tuple[FeatureMap, str | None]:
        with np.load(path, allow_pickle=False) as data:
            features = data["features"]
            image_size = data["image_size"]
            keypoints = data["keypoints"] if "keypoints" in data.files else None
            damage = str(data["damage"]) if "damage" in data.files else None
        if (
            features.ndim != 3
            or image_size.shape != (2,)
            or (keypoints is not None and (keypoints.ndim != 2 or keypoints.shape[1] != 2))
        ):
            raise CacheError(
                f"{path}: inconsistent entry (features {features.shape}, image_size "
                f"{image_size.shape}, keypoints {None if keypoints is None else keypoints.shape})"
            )
        fmap = FeatureMap(features.astype(np.float32), tuple(image_size.tolist()), keypoints)
        return fmap, damage

    def put(self, key: str, fmap: FeatureMap, damage: str | None = None) -> None:
        """Store ``fmap`` under ``key`` atomically (temp file, fsync, rename); overwrites.

        ``damage``: why the image's data is damaged, when its map was made anyway (see the module
        docstring); kept in the entry and returned by :meth:`get_entry`.
        """
        path = self.entry_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_manifest(key)
        arrays = {
            "features": np.asarray(fmap.features, dtype=_STORAGE_DTYPES[self.storage]),
            "image_size": np.asarray(fmap.image_size, dtype=np.int64),
        }
        if fmap.keypoints is not None:  # absent = never computed, as in the FeatureMap
            arrays["keypoints"] = np.asarray(fmap.keypoints, dtype=np.float32).reshape(-1, 2)
        if damage is not None:
            arrays["damage"] = np.asarray(str(damage))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getbuffer()

        def write(fh) -> None:
            # In two halves, so that the crash-injection tests can kill a writer mid-entry.
            fh.write(data[: len(data) // 2])
            crash_point("cache.mid_write")
            fh.write(data[len(data) // 2 :])

        atomic_write(path, write)

    def discard(self, key: str) -> None:
        """Remove entry ``key`` if present."""
        try:
            self.entry_path(key).unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ manifests

    def manifest(self, key: str) -> dict | None:
        """The manifest of the configuration ``key`` belongs to, or None if none was written."""
        path = self.entry_path(key).parents[1] / "manifest.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CacheError(f"{path}: unreadable manifest ({exc})") from exc

    def _write_manifest(self, key: str) -> None:
        config_dir = self.entry_path(key).parents[1]
        target = config_dir / "manifest.json"
        config = self._configs.get(key.split("-", 1)[0])
        if config is None or target.exists():
            return
        backbone_id = config["backbone_id"]
        manifest = {
            **config,
            # Backbone.id reads "<weights>:<layer>"; selret.features.extract appends "@<dtype>" below float32.
            "layer": backbone_id.split(":")[-1].split("@")[0] if ":" in backbone_id else None,
            "storage": self.storage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        atomic_write(target, lambda fh: fh.write(text.encode()))
