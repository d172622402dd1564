"""selret's own benchmark JSON: every field of a :class:`~.model.RetrievalBenchmark`, 0-based indices.

Version 2 stores the raw ground truth (``ok``, ``junk``, ``easy``, ``hard``) and the declared
``metrics``. Version 1 files stored revisited ``junk`` with the protocol's additions (easy or hard
images) folded in; they are read back to the raw lists (the three are disjoint in revisited ground
truth).
"""

from __future__ import annotations

from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import load_json
from selret.evaluation.datasets.model import Query, RetrievalBenchmark

JSON_FORMAT = "selret-benchmark"
JSON_VERSION = 2


def benchmark_to_json(benchmark: RetrievalBenchmark) -> dict:
    """The JSON object of ``benchmark`` (what :func:`read_benchmark_json` reads back)."""
    return {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "name": benchmark.name,
        "protocol": benchmark.protocol,
        "metrics": list(benchmark.metrics),
        "root": str(benchmark.root) if benchmark.root is not None else None,
        "images": benchmark.db_images,
        "queries": [
            {
                "name": q.name,
                "image": q.image,
                "bbx": list(q.bbox) if q.bbox is not None else None,
                "ok": q.positives,
                "junk": q.junk,
                "easy": q.easy,
                "hard": q.hard,
                "image_index": q.image_index,
                "category": q.category,
            }
            for q in benchmark.queries
        ],
        "rotations": benchmark.rotations,
    }


def _query(q: dict, version: int) -> Query:
    junk = q.get("junk", [])
    if version < 2 and q.get("easy") is not None and q.get("hard") is not None:
        protocol_added = set(q["easy"]) | set(q["hard"])
        junk = [j for j in junk if j not in protocol_added]
    return Query(
        name=q["name"],
        image=q["image"],
        bbox=q.get("bbx"),
        positives=q["ok"],
        junk=junk,
        easy=q.get("easy"),
        hard=q.get("hard"),
        image_index=q.get("image_index"),
        category=q.get("category"),
    )


def read_benchmark_json(path: str | Path, root: str | Path | None = None) -> RetrievalBenchmark:
    """A benchmark written by :func:`~.writer.write_gnd` as JSON; ``root`` overrides the stored root."""
    path = Path(path)
    data = load_json(path)
    if data.get("format") != JSON_FORMAT:
        raise DatasetError(path, f"not a {JSON_FORMAT} JSON file (format={data.get('format')!r})")
    version = data.get("version", 1)
    if not isinstance(version, int) or version > JSON_VERSION:
        raise DatasetError(path, f"benchmark JSON version {version!r} is newer than this selret")
    try:
        return RetrievalBenchmark(
            name=data["name"],
            root=root if root is not None else data.get("root"),
            db_images=data["images"],
            queries=[_query(q, version) for q in data["queries"]],
            protocol=data.get("protocol", "standard"),
            rotations={str(k): int(v) for k, v in (data.get("rotations") or {}).items()},
            metrics=tuple(data.get("metrics") or ()),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(path, f"malformed benchmark: {type(e).__name__}: {e}") from None
