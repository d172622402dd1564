"""cirtorch / revisitop ground-truth pickles: ``gnd_*.pkl`` (``ok``/``junk``) and revisited ``gnd_r*.pkl``
(``easy``/``hard``/``junk``)."""

from __future__ import annotations

import pickle
from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import Resolver, bbox_or_none, int_list
from selret.evaluation.datasets.model import Query, RetrievalBenchmark
from selret.evaluation.metrics import normalize_protocol


def read_gnd_pkl(
    path: str | Path,
    root: str | Path | None = None,
    protocol: str | None = None,
    name: str | None = None,
) -> RetrievalBenchmark:
    """cirtorch / revisitop ground-truth pickle: ``{'imlist', 'qimlist', 'gnd'}`` (0-based).

    ``gnd[i]`` has ``ok``/``junk`` (Oxford5k / Paris6k style) or ``easy``/``hard``/``junk``
    (revisited Oxford / Paris), plus optional ``bbx``; the lists are kept as they are and
    ``protocol`` is only the one the benchmark is scored under by default: easy / medium (the
    default for revisited ground truth) / hard, or ``standard`` (the default when every entry has
    ``ok``; a file with both ``ok`` and ``easy``/``hard`` is scored from ``ok`` unless a revisited
    protocol is given). Pickles can run code when loaded: only read files you trust.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except Exception as e:  # unpickling raises many types for a corrupt file
        raise DatasetError(path, f"not a readable pickle: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise DatasetError(path, "expected a dict with keys imlist, qimlist, gnd")
    imlist, qimlist, gnd = list(data["imlist"]), list(data["qimlist"]), list(data["gnd"])
    if len(qimlist) != len(gnd):
        raise DatasetError(path, f"{len(qimlist)} query names but {len(gnd)} gnd entries")
    if gnd and not all(isinstance(g, dict) for g in gnd):
        raise DatasetError(path, "gnd entries must be dicts")

    revisited = bool(gnd) and all("easy" in g and "hard" in g for g in gnd)
    classic = bool(gnd) and all("ok" in g for g in gnd)
    if protocol in (None, "standard") and (classic or not gnd):
        protocol = "standard"
    elif revisited:
        protocol = normalize_protocol(protocol or "medium")
    elif classic:
        raise DatasetError(
            path, f"protocol {protocol!r} needs easy/hard lists; this file has ok/junk"
        )
    else:
        raise DatasetError(path, "gnd entries need 'ok' or 'easy' and 'hard'")

    resolve = Resolver(Path(root) if root is not None else None, path)
    rel, q_rel = resolve([str(n) for n in imlist]), resolve([str(q) for q in qimlist])
    index = {str(n): i for i, n in enumerate(imlist)}
    n = len(imlist)
    queries = []
    for i, (qn, g) in enumerate(zip(qimlist, gnd, strict=True)):
        where = f"gnd[{i}]"
        ok, junk = int_list(g.get("ok")), int_list(g.get("junk"))
        has_easy_hard = "easy" in g and "hard" in g
        easy = int_list(g["easy"]) if has_easy_hard else None
        hard = int_list(g["hard"]) if has_easy_hard else None
        bad = [k for k in ok + junk + (easy or []) + (hard or []) if not 0 <= k < n]
        if bad:
            raise DatasetError(path, f"{where}: indices outside 0..{n - 1}: {bad[:5]}")
        queries.append(
            Query(
                name=str(qn),
                image=q_rel[i],
                bbox=bbox_or_none(g.get("bbx"), path, where),
                positives=ok,
                junk=junk,
                easy=easy,
                hard=hard,
                image_index=index.get(str(qn)),
            )
        )
    stem = path.stem.removeprefix("gnd_")
    return RetrievalBenchmark(
        name=name or stem, root=root, db_images=rel, queries=queries, protocol=protocol
    )


def revisitop_payload(benchmark: RetrievalBenchmark) -> dict:
    """The revisitop pickle ``{'imlist', 'qimlist', 'gnd'}`` of ``benchmark`` (0-based indices).

    Names lose a ``.jpg`` extension (revisitop adds it back). Every query writes its raw lists:
    ``ok`` (unless a revisited query has none), ``junk``, and ``easy``/``hard`` when it has them;
    a query without them gets ``easy = ok`` and ``hard = []`` so that revisitop-style code sees
    the positives under Easy and Medium (Hard then has no positives).
    """

    def bare(p: str) -> str:
        return p[: -len(".jpg")] if p.lower().endswith(".jpg") else p

    gnd = []
    for q in benchmark.queries:
        g: dict = {} if q.is_revisited and not q.positives else {"ok": list(q.positives)}
        g["junk"] = list(q.junk)
        if q.is_revisited:
            g |= {"easy": list(q.easy), "hard": list(q.hard)}
        else:
            g |= {"easy": list(q.positives), "hard": []}
        if q.bbox is not None:
            g["bbx"] = list(q.bbox)
        gnd.append(g)
    return {
        "imlist": [bare(p) for p in benchmark.db_images],
        "qimlist": [bare(q.image) for q in benchmark.queries],
        "gnd": gnd,
    }
