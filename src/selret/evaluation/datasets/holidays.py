"""INRIA Holidays: eval_holidays' ``perfect_result.dat`` (+ ``holidays_images.dat``)."""

from __future__ import annotations

from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import (
    Resolver,
    index_of,
    lookup,
    read_lines,
    strip_image_ext,
)
from selret.evaluation.datasets.lists import read_image_list
from selret.evaluation.datasets.model import Query, RetrievalBenchmark


def read_holidays(
    perfect_result: str | Path,
    images_list: str | Path | None = None,
    root: str | Path | None = None,
    rotations: dict[str, int] | None = None,
    name: str = "holidays",
) -> RetrievalBenchmark:
    """INRIA Holidays from eval_holidays' ``perfect_result.dat`` format.

    Each line is ``query.jpg 0 img1.jpg 1 img2.jpg ...``: the query, then (rank, image) pairs of
    its relevant images. Query = first image of the line (full image, no crop), positives = the
    others, the query itself is junk (removed from its own ranking). The database is
    ``images_list`` (``holidays_images.dat``, one name per line) if given, else the images of
    ``perfect_result`` in file order. ``rotations`` (see :func:`read_rotation_list`) is attached.
    """
    perfect_result = Path(perfect_result)
    groups = []
    for lineno, line in enumerate(read_lines(perfect_result), 1):
        tokens = line.split()
        if len(tokens) % 2 != 1 or not all(t.lstrip("-").isdigit() for t in tokens[1::2]):
            raise DatasetError(
                perfect_result, f"line {lineno}: expected 'query rank image rank image ...'"
            )
        groups.append([tokens[0]] + tokens[2::2])
    if not groups:
        raise DatasetError(perfect_result, "no query lines")
    if images_list is not None:
        db = read_image_list(images_list)
        source = Path(images_list)
    else:
        db = [im for g in groups for im in g]
        source = perfect_result
    index = index_of(db, source)
    rel = Resolver(Path(root) if root is not None else None, source)(db)
    queries = []
    for g in groups:
        idx = lookup(index, g, perfect_result, f"group of {g[0]}")
        queries.append(
            Query(
                name=strip_image_ext(g[0]),
                image=rel[idx[0]],
                positives=idx[1:],
                junk=[idx[0]],
                image_index=idx[0],
            )
        )
    return RetrievalBenchmark(
        name=name, root=root, db_images=rel, queries=queries, rotations=dict(rotations or {})
    )
