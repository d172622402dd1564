"""Oxford5k / Paris6k ground-truth folders: ``<query>_{good,ok,junk,query}.txt`` per query."""

from __future__ import annotations

from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import index_of, list_images, lookup, read_lines, with_ext
from selret.evaluation.datasets.model import Query, RetrievalBenchmark


def read_oxford_gt(
    gt_dir: str | Path, image_dir: str | Path | None = None, name: str | None = None
) -> RetrievalBenchmark:
    """Oxford5k / Paris6k ground-truth folder: ``<query>_{good,ok,junk,query}.txt`` per query.

    ``<query>_query.txt`` is ``[oxc1_]<image> x1 y1 x2 y2``; positives are ``good`` + ``ok``,
    ``junk`` is removed from the ranking. The database is every image under ``image_dir`` when it
    is given (all ground-truth names must be there); without it, the database is inferred as the
    sorted union of the names in the gt files, which covers only images labelled for some query
    (negatives are missing), so use it for inspecting the ground truth, not for mAP.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise DatasetError(gt_dir, "ground-truth folder not found")
    query_files = sorted(gt_dir.glob("*_query.txt"))
    if not query_files:
        raise DatasetError(gt_dir, "no <query>_query.txt ground-truth files in this folder")

    raw = []
    for qf in query_files:
        qname = qf.name[: -len("_query.txt")]
        lines = read_lines(qf)
        tokens = lines[0].split() if lines else []
        if len(tokens) != 5:
            raise DatasetError(qf, "expected one line '<image> x1 y1 x2 y2'")
        try:
            bbox = tuple(float(t) for t in tokens[1:])
        except ValueError:
            raise DatasetError(qf, f"bounding box is not numeric: {tokens[1:]}") from None
        image = tokens[0].removeprefix("oxc1_")
        labels = {k: read_lines(gt_dir / f"{qname}_{k}.txt") for k in ("good", "ok", "junk")}
        raw.append((qname, image, bbox, labels))

    if image_dir is not None:
        image_dir = Path(image_dir)
        db = list_images(image_dir)
        if not db:
            raise DatasetError(image_dir, "no images in this folder")
        stems = [Path(p).stem for p in db]
    else:
        names = set()
        for _, image, _, labels in raw:
            names.add(image)
            for v in labels.values():
                names.update(v)
        stems = sorted(names)
        db = [with_ext(s) for s in stems]
    index = index_of(stems, image_dir or gt_dir)

    queries = []
    for qname, image, bbox, labels in raw:
        where = gt_dir / f"{qname}_*.txt"
        (qidx,) = lookup(index, [image], where, "query")
        queries.append(
            Query(
                name=qname,
                image=db[qidx],
                bbox=bbox,
                positives=lookup(index, labels["good"] + labels["ok"], where, "good/ok"),
                junk=lookup(index, labels["junk"], where, "junk"),
                image_index=qidx,
                category=qname.rsplit("_", 1)[0],
            )
        )
    return RetrievalBenchmark(
        name=name or gt_dir.name, root=image_dir, db_images=db, queries=queries
    )
