"""Helpers every ground-truth reader shares: text, JSON and bounding boxes with errors that name the
file, name -> index tables, and the resolution of ground-truth image names to files on disk.

Image names in ground-truth files have no extension; when ``root`` (the image folder) is given,
each name is resolved to the actual file under it (flat cirtorch ``jpg/`` layout or nested official
layout alike) and a missing image is an error. Without ``root`` the name plus ``.jpg`` is kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from selret import files
from selret.errors import DatasetError
from selret.files import is_image_name

BBox = tuple[float, float, float, float]


def strip_image_ext(name: str) -> str:
    """``name`` with '/' separators and without its image extension (other suffixes kept)."""
    name = str(name).replace("\\", "/")
    return str(Path(name).with_suffix("")).replace("\\", "/") if is_image_name(name) else name


def with_ext(name: str) -> str:
    """``name`` as an image file name: ``.jpg`` added unless it has an image extension."""
    return name if is_image_name(name) else name + ".jpg"


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted '/'-separated relative paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "not a folder")
    return sorted(p.relative_to(folder).as_posix() for p in files.list_images(folder))


class Resolver:
    """Maps ground-truth image names (usually without extension) to paths under an image folder."""

    def __init__(self, root: Path | None, source: str | Path):
        self.root = root
        self.source = source
        self._by_stem: dict[str, str | None] | None = None

    def _stem_index(self) -> dict[str, str | None]:
        if self._by_stem is None:
            index: dict[str, str | None] = {}
            for rel in list_images(self.root):
                stem = Path(rel).stem
                # None marks a stem present in two folders: ambiguous, resolved only by full path.
                index[stem] = None if stem in index else rel
            self._by_stem = index
        return self._by_stem

    def _one(self, name: str) -> str | None:
        name = str(name).replace("\\", "/")
        if self.root is None:
            return with_ext(name)
        for candidate in (name, name + ".jpg"):
            if is_image_name(candidate) and (self.root / candidate).is_file():
                return candidate
        return self._stem_index().get(Path(strip_image_ext(name)).name)

    def __call__(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        resolved = [self._one(n) for n in names]
        missing = [n for n, r in zip(names, resolved, strict=True) if r is None]
        if missing:
            raise DatasetError(
                self.root,
                f"{len(missing)} of {len(names)} images named in {self.source} are missing or "
                f"ambiguous under this folder, e.g. {missing[:3]}",
            )
        return resolved  # type: ignore[return-value]


def read_lines(path: Path, comments: bool = False) -> list[str]:
    """Non-blank stripped lines of a text file (and without '#' lines when ``comments``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"cannot read as text: {e}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not (comments and line.startswith("#"))]


def load_json(path: Path) -> dict:
    """A JSON file whose top level is an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(path, f"not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(path, "JSON top level must be an object")
    return data


def index_of(names: Sequence[str], path: Path) -> dict[str, int]:
    """name -> database index; a name listed twice is an error."""
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in index:
            raise DatasetError(path, f"image {n!r} is listed twice in the database")
        index[n] = i
    return index


def lookup(index: dict[str, int], names: Iterable[str], path: Path, what: str) -> list[int]:
    """Database indices of ``names``; a name not in the database is an error."""
    out, missing = [], []
    for n in names:
        if n in index:
            out.append(index[n])
        else:
            missing.append(n)
    if missing:
        raise DatasetError(
            path, f"{what} names {len(missing)} images not in the database, e.g. {missing[:3]}"
        )
    return out


def int_list(x) -> list[int]:
    """A list of ints from any array-like of integers (None: empty)."""
    return np.asarray(x if x is not None else [], dtype=np.int64).reshape(-1).tolist()


def bbox_or_none(value, path: Path, where: str) -> BBox | None:
    """``(x1, y1, x2, y2)`` floats from a 4-value array-like; None for None or an empty array."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        return None
    if arr.size != 4:
        raise DatasetError(path, f"{where}: bbx must have 4 values (x1 y1 x2 y2), got {arr.size}")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]
