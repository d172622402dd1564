"""MATLAB ground-truth structs ``gnd_*.mat`` (R-MAC-style code: Oxford5k, Paris6k, Holidays, Oxford105k, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from selret.errors import DatasetError
from selret.evaluation.datasets.common import Resolver, bbox_or_none, index_of
from selret.evaluation.datasets.model import Query, RetrievalBenchmark


def _mat_str(x) -> str:
    """A MATLAB string as loaded by scipy (nested object / char arrays) -> str."""
    while isinstance(x, np.ndarray):
        if x.dtype.kind == "U" and x.size >= 1:
            return (
                "".join(str(c) for c in x.ravel()) if x.dtype.itemsize == 4 else str(x.ravel()[0])
            )
        if x.size != 1:
            raise ValueError(f"expected a single string, got an array of shape {x.shape}")
        x = x.ravel()[0]
    return str(x)


def _mat_ints(x) -> np.ndarray:
    return np.asarray(x).reshape(-1).astype(np.int64) if np.size(x) else np.empty(0, np.int64)


def _mat_field(m: dict, names: Sequence[str]):
    for n in names:
        if n in m:
            return m[n]
    return None


def read_gnd_mat(
    path: str | Path, root: str | Path | None = None, name: str | None = None
) -> RetrievalBenchmark:
    """MATLAB ground-truth struct ``gnd_<dataset>.mat`` (R-MAC-style code).

    Database names: ``imlist`` or ``feature_name``. Queries: ``qimlist`` (names), ``query_list``
    (rows ``name, index[, query name]``) or ``qidx`` (indices). ``gnd`` is a struct array with
    ``ok``, ``junk`` and optionally ``bbx``. Indices are MATLAB 1-based in the known files; the base
    is checked against the query names when both names and indices are present, else inferred
    (an index 0 means 0-based, otherwise 1-based). ``root`` is the image folder (see module doc).
    """
    path = Path(path)
    try:
        import scipy.io

        m = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except Exception as e:
        # scipy raises many types on a bad file (IndexError on a short one, NotImplementedError
        # on MATLAB v7.3 / HDF5 files, which it cannot read).
        raise DatasetError(
            path, f"not a readable MATLAB .mat file: {type(e).__name__}: {e}"
        ) from None

    imlist = _mat_field(m, ("imlist", "feature_name"))
    gnd = _mat_field(m, ("gnd",))
    if imlist is None or gnd is None:
        keys = sorted(k for k in m if not k.startswith("__"))
        raise DatasetError(path, f"expected variables imlist/feature_name and gnd, found {keys}")
    if gnd.dtype.names is None or "ok" not in gnd.dtype.names:
        raise DatasetError(path, "gnd is not a struct array with an 'ok' field")
    try:
        names = [_mat_str(x) for x in imlist.ravel()]
    except ValueError as e:
        raise DatasetError(path, f"imlist: {e}") from None
    gnd = gnd.ravel()
    n_q = len(gnd)

    q_names: list[str] | None = None
    q_labels: list[str] | None = None
    q_idx: np.ndarray | None = None
    query_list = _mat_field(m, ("query_list",))
    if query_list is not None:
        if query_list.size % max(n_q, 1):
            raise DatasetError(path, f"query_list of shape {query_list.shape} for {n_q} queries")
        rows = query_list.reshape(n_q, -1)
        q_names = [_mat_str(r[0]) for r in rows]
        if rows.shape[1] >= 2:
            q_idx = np.array([int(_mat_ints(r[1])[0]) for r in rows])
        if rows.shape[1] >= 3:
            q_labels = [_mat_str(r[2]) for r in rows]
    if "qimlist" in m:
        q_names = [_mat_str(x) for x in m["qimlist"].ravel()]
    if "qidx" in m:
        q_idx = _mat_ints(m["qidx"])
    if q_names is None and q_idx is None:
        raise DatasetError(path, "no query list (qimlist, query_list or qidx)")
    for what, v in (("query names", q_names), ("query indices", q_idx)):
        if v is not None and len(v) != n_q:
            raise DatasetError(path, f"{len(v)} {what} but {n_q} gnd entries")

    all_idx = np.concatenate(
        [_mat_ints(g[f]) for g in gnd for f in ("ok", "junk") if f in gnd.dtype.names]
        + ([q_idx] if q_idx is not None else [])
    )
    base = _index_base(names, q_names, q_idx, all_idx, path)
    if all_idx.size and (all_idx.min() - base < 0 or all_idx.max() - base >= len(names)):
        raise DatasetError(path, f"indices out of range for {len(names)} images")

    index = index_of(names, path)
    resolve = Resolver(Path(root) if root is not None else None, path)
    rel = resolve(names)
    queries = []
    for i, g in enumerate(gnd):
        qi = int(q_idx[i]) - base if q_idx is not None else index.get(q_names[i])  # type: ignore[index]
        qname = q_names[i] if q_names is not None else names[qi]  # type: ignore[index]
        image = rel[qi] if qi is not None else resolve([qname])[0]
        bbox = bbox_or_none(g["bbx"], path, f"query {i}") if "bbx" in gnd.dtype.names else None
        queries.append(
            Query(
                name=q_labels[i] if q_labels is not None else qname,
                image=image,
                bbox=bbox,
                positives=(_mat_ints(g["ok"]) - base).tolist(),
                junk=(_mat_ints(g["junk"]) - base).tolist() if "junk" in gnd.dtype.names else [],
                image_index=qi,
                category=q_labels[i].rsplit("_", 1)[0] if q_labels is not None else None,
            )
        )
    stem = path.stem.removeprefix("gnd_")
    return RetrievalBenchmark(name=name or stem.lower(), root=root, db_images=rel, queries=queries)


def _index_base(names, q_names, q_idx, all_idx: np.ndarray, path: Path) -> int:
    """0 or 1: the index base of a MATLAB gnd file (see :func:`read_gnd_mat`)."""
    if q_names is not None and q_idx is not None:
        for base in (1, 0):
            if all(
                0 <= k - base < len(names) and names[k - base] == n
                for k, n in zip(q_idx, q_names, strict=True)
            ):
                return base
        raise DatasetError(path, "query indices do not point at the query names (0- or 1-based)")
    return 0 if all_idx.size and all_idx.min() == 0 else 1
