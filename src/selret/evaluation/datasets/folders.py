"""Generic labelled folders: ``root/<object>/<images>``, one folder per object."""

from __future__ import annotations

from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import list_images, strip_image_ext
from selret.evaluation.datasets.model import Query, RetrievalBenchmark


def read_object_folders(root: str | Path, name: str | None = None) -> RetrievalBenchmark:
    """Generic labelled folders: ``root/<object>/<images>`` (sub-folders of an object included).

    Every image of an object with at least two images queries the whole database; positives are
    the other images of its folder and the query itself is junk. Images directly in ``root``
    belong to no object: they are database distractors only.
    """
    root = Path(root)
    db = list_images(root)
    if not db:
        raise DatasetError(root, "no images in this folder")
    members: dict[str, list[int]] = {}
    for i, rel in enumerate(db):
        if "/" in rel:
            members.setdefault(rel.split("/", 1)[0], []).append(i)
    if not any(len(v) >= 2 for v in members.values()):
        raise DatasetError(
            root, "no sub-folder holds two or more images, so nothing can be queried"
        )
    queries = [
        Query(
            name=strip_image_ext(db[i]),
            image=db[i],
            positives=[j for j in idx if j != i],
            junk=[i],
            image_index=i,
            category=obj,
        )
        for obj, idx in sorted(members.items())
        if len(idx) >= 2
        for i in idx
    ]
    return RetrievalBenchmark(name=name or root.name, root=root, db_images=db, queries=queries)
