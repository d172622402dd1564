"""The paris6k-250 subset of the shared data: its ``ground_truth.json``."""

from __future__ import annotations

from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import Resolver, bbox_or_none, index_of, load_json, lookup
from selret.evaluation.datasets.model import Query, RetrievalBenchmark

PARIS250_PROTOCOLS = ("official-12", "loo")


def read_paris6k_250(
    path: str | Path, root: str | Path | None = None, protocol: str = "official-12"
) -> RetrievalBenchmark:
    """The paris6k-250 subset's ``ground_truth.json`` (see its README).

    ``official-12``: the official queries whose image is in the subset, cropped by ``bbx``;
    positives = ``ok``, ``junk`` removed. ``loo``: each image labelled ``ok`` for a landmark
    queries with its full image; positives = the other ``ok`` images of that landmark; that
    landmark's ``junk`` images and the query itself are removed. ``root`` (default: the JSON's
    folder) holds the images, found by name under it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "ground_truth.json"
    if protocol not in PARIS250_PROTOCOLS:
        raise ValueError(
            f"unknown paris6k-250 protocol {protocol!r}; use one of {PARIS250_PROTOCOLS}"
        )
    data = load_json(path)
    if not {"images", "queries", "image_labels"} <= set(data):
        raise DatasetError(path, "expected keys images, queries, image_labels")
    root = Path(root) if root is not None else path.parent
    names = [str(n) for n in data["images"]]
    index = index_of(names, path)
    rel = Resolver(root, path)(names)

    queries = []
    if protocol == "official-12":
        for q in data["queries"]:
            if not q.get("query_in_subset"):
                continue
            where = f"query {q.get('name')}"
            (qi,) = lookup(index, [q["query_image"]], path, where)
            queries.append(
                Query(
                    name=q["name"],
                    image=rel[qi],
                    bbox=bbox_or_none(q.get("bbx"), path, where),
                    positives=lookup(index, q.get("ok", []), path, where),
                    junk=lookup(index, q.get("junk", []), path, where),
                    image_index=qi,
                    category=q["name"].rsplit("_", 1)[0],
                )
            )
    else:
        labels = data["image_labels"]
        lookup(index, labels, path, "image_labels")
        by_landmark: dict[str, dict[str, list[int]]] = {}
        for im, lab in labels.items():
            for landmark, kind in lab.items():
                if kind not in ("ok", "junk"):
                    raise DatasetError(path, f"image {im}: label {kind!r} is not ok or junk")
                by_landmark.setdefault(landmark, {"ok": [], "junk": []})[kind].append(index[im])
        for i, im in enumerate(names):
            for landmark in sorted(labels.get(im, {})):
                if labels[im][landmark] != "ok":
                    continue
                lm = by_landmark[landmark]
                queries.append(
                    Query(
                        name=f"{landmark}/{im}",
                        image=rel[i],
                        positives=sorted(j for j in lm["ok"] if j != i),
                        junk=sorted(lm["junk"]) + [i],
                        image_index=i,
                        category=landmark,
                    )
                )
    return RetrievalBenchmark(
        name="paris6k-250", root=root, db_images=rel, queries=queries, protocol=protocol
    )
