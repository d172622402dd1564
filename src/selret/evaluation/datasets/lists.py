"""Plain lists: image names (R1M / Flickr100k distractors) and per-image rotations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import read_lines, strip_image_ext, with_ext
from selret.evaluation.datasets.model import RetrievalBenchmark


def read_image_list(path: str | Path) -> list[str]:
    """Image names, one per line (blank lines and '#' comments ignored): R1M / Flickr100k lists."""
    path = Path(path)
    names = read_lines(path, comments=True)
    if not names:
        raise DatasetError(path, "no image names in this list")
    return names


def add_distractors(
    benchmark: RetrievalBenchmark, names: Sequence[str], root: str | Path | None = None
) -> RetrievalBenchmark:
    """A copy of ``benchmark`` with distractor images appended to the database.

    ``names`` are relative to ``root`` (stored as ``root/name`` so they may live outside the
    benchmark root), or relative to the benchmark root when ``root`` is None. Existing indices,
    hence the ground truth, are unchanged.
    """
    extra = [with_ext(str(n)) for n in names]
    if root is not None:
        extra = [str(Path(root) / n) for n in extra]
    return replace(
        benchmark,
        name=f"{benchmark.name}+{len(extra)}",
        db_images=benchmark.db_images + extra,
        queries=list(benchmark.queries),
        rotations=dict(benchmark.rotations),
    )


def read_rotation_list(path: str | Path) -> dict[str, int]:
    """Rotation list: lines ``<image name> <degrees>`` (clockwise; '#' comments allowed).

    Used for INRIA Holidays, where some images are stored mis-oriented and the paper rotates them
    by +-90 degrees. No default list is shipped: the paper's authors distributed pre-rotated images
    rather than a list. Keys are the names without extension; degrees are multiples of 90,
    returned in 0..270 (-90 -> 270).
    """
    path = Path(path)
    out: dict[str, int] = {}
    for lineno, line in enumerate(read_lines(path, comments=True), 1):
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            degrees = int(float(parts[1]))
        except ValueError:
            raise DatasetError(
                path, f"line {lineno}: expected '<image> <degrees>', got {line!r}"
            ) from None
        if degrees % 90:
            raise DatasetError(path, f"line {lineno}: rotation {degrees} is not a multiple of 90")
        out[strip_image_ext(parts[0])] = degrees % 360
    return out
