"""UKBench: ``ukbenchNNNNN.jpg`` images in groups of four views of one object."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from selret.errors import DatasetError
from selret.evaluation.datasets.common import list_images
from selret.evaluation.datasets.model import NS_SCORE, Query, RetrievalBenchmark

UKBENCH_PROTOCOLS = ("ns", "loo")
UKBENCH_RE = re.compile(r"ukbench(\d{5})$", re.IGNORECASE)


def read_ukbench(image_dir: str | Path, protocol: str = "ns") -> RetrievalBenchmark:
    """UKBench: ``ukbenchNNNNN.jpg``, object ``NNNNN // 4`` (groups of 4 consecutive images).

    Every image queries the whole database; its positives are the 4 images of its group, itself
    included. ``protocol`` is how it is scored: ``ns`` (default) counts the query as a positive, as
    the N-S score does; ``loo`` makes it junk (see :func:`~.model.apply_protocol`). The benchmark
    declares the N-S score (:data:`~.model.NS_SCORE`).
    """
    image_dir = Path(image_dir)
    if protocol not in UKBENCH_PROTOCOLS:
        raise ValueError(f"unknown UKBench protocol {protocol!r}; use one of {UKBENCH_PROTOCOLS}")
    db, ids = [], []
    for rel in list_images(image_dir):
        match = UKBENCH_RE.match(Path(rel).stem)
        if match:
            db.append(rel)
            ids.append(int(match.group(1)))
    if not db:
        raise DatasetError(image_dir, "no ukbenchNNNNN image files in this folder")
    order = np.argsort(ids, kind="stable")
    db = [db[i] for i in order]
    groups = np.asarray(ids)[order] // 4
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(i)
    queries = []
    for i, g in enumerate(groups.tolist()):
        same = members[g]
        queries.append(
            Query(
                name=Path(db[i]).stem,
                image=db[i],
                positives=same,
                image_index=i,
                category=f"{g:05d}",
            )
        )
    return RetrievalBenchmark(
        name="ukbench", root=image_dir, db_images=db, queries=queries, protocol=protocol,
        metrics=(NS_SCORE,),
    )  # fmt: skip


def ukbench_groups(benchmark: RetrievalBenchmark) -> np.ndarray:
    """(n_db,) object ids of a UKBench benchmark, for :func:`selret.evaluation.metrics.ukbench_ns_score`."""
    ids = [UKBENCH_RE.match(Path(p).stem) for p in benchmark.db_images]
    if not all(ids):
        raise ValueError(f"{benchmark.name}: not every database image is named ukbenchNNNNN")
    return np.array([int(m.group(1)) // 4 for m in ids])  # type: ignore[union-attr]
