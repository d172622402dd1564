"""Stanford Mobile Visual Search (one category) from a ``groups.json``."""

from __future__ import annotations

from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import load_json, strip_image_ext
from selret.evaluation.datasets.model import Query, RetrievalBenchmark


def read_smvs(root: str | Path, groups_file: str = "groups.json") -> RetrievalBenchmark:
    """Stanford Mobile Visual Search (one category) from a ``groups.json``.

    ``groups`` maps an object id to its image paths (relative to ``root``); the one under
    ``Reference/`` is the database image, the others (one folder per phone) are queries with that
    single positive. ``Query.category`` is the phone folder, for per-phone reports.
    """
    root = Path(root)
    path = root / groups_file if root.is_dir() else root
    root = path.parent
    data = load_json(path)
    groups = data.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise DatasetError(path, "expected a non-empty 'groups' object: id -> list of image paths")
    db: list[str] = []
    pending = []
    for gid in sorted(groups):
        paths = [str(p) for p in groups[gid]]
        refs = [p for p in paths if p.split("/")[0] == "Reference"]
        if len(refs) != 1:
            raise DatasetError(
                path, f"group {gid}: expected one Reference/ image, found {len(refs)}"
            )
        db.append(refs[0])
        pending.extend((p, len(db) - 1) for p in paths if p != refs[0])
    pending.sort(key=lambda t: (t[0].split("/")[0], t[0]))
    queries = [
        Query(
            name=strip_image_ext(p),
            image=p,
            positives=[ref],
            category=p.split("/")[0] if "/" in p else None,
        )
        for p, ref in pending
    ]
    return RetrievalBenchmark(name="smvs", root=root, db_images=db, queries=queries)
