"""Retrieval benchmarks: one in-memory description and readers for the standard ground-truth formats.

A :class:`RetrievalBenchmark` is a list of database images (paths relative to ``root``) and a list
of :class:`Query` records whose positives and junk are 0-based database indices, ready for
:func:`selret.evaluation.metrics.compute_map` via :meth:`RetrievalBenchmark.gnd`.

Readers (each takes the real on-disk format):

* :func:`read_oxford_gt` - Oxford5k / Paris6k ``<query>_{good,ok,junk,query}.txt`` folders;
* :func:`read_gnd_mat` - MATLAB ``gnd_*.mat`` structs (Oxford5k, Paris6k, Holidays, Oxford105k, ...);
* :func:`read_gnd_pkl` - cirtorch ``gnd_*.pkl`` (``ok``/``junk``) and revisited ``gnd_r*.pkl``
  (``easy``/``hard``/``junk``, Easy/Medium/Hard protocols);
* :func:`read_holidays` - INRIA Holidays ``perfect_result.dat`` (+ ``holidays_images.dat``);
* :func:`read_ukbench`, :func:`read_smvs`, :func:`read_paris6k_250`, :func:`read_object_folders`;
* :func:`read_image_list` / :func:`add_distractors` (R1M, Flickr100k), :func:`read_rotation_list`.

:func:`write_gnd` saves any benchmark (JSON, or revisited-format pickle) and :func:`load_benchmark`
dispatches on a benchmark name or a path.

Image names in ground-truth files have no extension; when ``root`` (the image folder) is given,
each name is resolved to the actual file under it (flat cirtorch ``jpg/`` layout or nested official
layout alike) and a missing image is an error. Without ``root`` the name plus ``.jpg`` is kept.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from selret import files
from selret.errors import DatasetError
from selret.evaluation.metrics import REVISITED_PROTOCOLS, normalize_protocol, revisited_gnd
from selret.files import is_image_name

BENCHMARK_NAMES = (
    "oxford5k",
    "paris6k",
    "oxford105k",
    "paris106k",
    "roxford5k",
    "rparis6k",
    "holidays",
    "ukbench",
    "smvs",
    "paris6k-250",
)
PARIS250_PROTOCOLS = ("official-12", "loo")
UKBENCH_PROTOCOLS = ("ns", "loo")
JSON_FORMAT = "selret-benchmark"

BBox = tuple[float, float, float, float]


@dataclass
class Query:
    """One query of a benchmark.

    ``image`` is the query image's path relative to the benchmark root; ``bbox`` the crop
    ``(x1, y1, x2, y2)`` in original-image pixels, or None for the full image. ``positives`` and
    ``junk`` are 0-based database indices (junk is removed from the ranking before scoring).
    ``easy``/``hard`` are kept for revisited ground truth (None otherwise), ``image_index`` is the
    query image's database index when it is also a database image, and ``category`` an optional
    label for per-group reports (phone model, landmark, object).
    """

    name: str
    image: str
    bbox: BBox | None = None
    positives: list[int] = field(default_factory=list)
    junk: list[int] = field(default_factory=list)
    easy: list[int] | None = None
    hard: list[int] | None = None
    image_index: int | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        self.positives = [int(i) for i in self.positives]
        self.junk = [int(i) for i in self.junk]
        if self.easy is not None:
            self.easy = [int(i) for i in self.easy]
        if self.hard is not None:
            self.hard = [int(i) for i in self.hard]
        if self.bbox is not None:
            if len(self.bbox) != 4:
                raise ValueError(
                    f"query {self.name}: bbox must be (x1, y1, x2, y2), got {self.bbox}"
                )
            self.bbox = tuple(float(v) for v in self.bbox)  # type: ignore[assignment]

    @property
    def is_revisited(self) -> bool:
        return self.easy is not None and self.hard is not None


@dataclass
class RetrievalBenchmark:
    """A database of images plus queries with their ground truth.

    ``root`` is the folder the relative image paths live in (None: paths are used as given);
    ``db_images`` are those paths (an absolute path, e.g. of a distractor, is kept as is).
    ``protocol`` names the evaluation protocol (``standard``, ``easy``/``medium``/``hard``,
    ``official-12``, ``loo``, ``ns``). ``rotations`` maps image keys (relative path without
    extension, or the bare file stem) to a clockwise rotation in degrees, see :meth:`rotation`.
    """

    name: str
    root: Path | None
    db_images: list[str]
    queries: list[Query]
    protocol: str = "standard"
    rotations: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root) if self.root is not None else None
        self.db_images = [str(p) for p in self.db_images]
        n = len(self.db_images)
        for q in self.queries:
            for label, idx in (("positives", q.positives), ("junk", q.junk)):
                bad = [i for i in idx if not 0 <= i < n]
                if bad:
                    raise ValueError(
                        f"{self.name}: query {q.name} has {label} indices outside 0..{n - 1}: {bad[:5]}"
                    )

    def __len__(self) -> int:
        return len(self.db_images)

    def _path(self, rel: str) -> Path:
        return Path(rel) if self.root is None else self.root / rel

    def image_path(self, i: int) -> Path:
        """Path of database image ``i``."""
        return self._path(self.db_images[i])

    def query_path(self, q: Query | int) -> Path:
        """Path of a query's image (the query record or its index in ``queries``)."""
        query = self.queries[q] if isinstance(q, int) else q
        return self._path(query.image)

    def rotation(self, image: str) -> int:
        """Clockwise rotation in degrees (0, 90, 180, 270) to apply to an image before use.

        ``image`` is a relative path as stored in ``db_images`` or ``Query.image``.
        """
        key = _strip_image_ext(image)
        return self.rotations.get(key, self.rotations.get(key.rsplit("/", 1)[-1], 0))

    def gnd(self, revisited: bool = False) -> list[dict]:
        """Ground truth as a list of dicts, one per query, plus ``bbx`` when the query has a box.

        Default: ``ok`` / ``junk`` under this benchmark's protocol, for
        :func:`selret.evaluation.metrics.compute_map`. ``revisited=True``: the revisitop form ``easy`` /
        ``hard`` / ``junk`` (junk before any protocol added easy or hard to it), for
        :func:`selret.evaluation.metrics.compute_map_revisited`; every query must be revisited.
        """
        out = []
        for q in self.queries:
            if not revisited:
                g: dict = {"ok": list(q.positives), "junk": list(q.junk)}
            elif q.is_revisited:
                g = {"easy": list(q.easy), "hard": list(q.hard), "junk": _base_junk(q)}
            else:
                raise ValueError(f"{self.name}: query {q.name} has no easy/hard ground truth")
            if q.bbox is not None:
                g["bbx"] = list(q.bbox)
            out.append(g)
        return out

    def summary(self) -> str:
        """One line: name, protocol, database and query counts."""
        return f"{self.name} ({self.protocol}): {len(self)} database images, {len(self.queries)} queries"


# ----------------------------------------------------------------------------- helpers


def _strip_image_ext(name: str) -> str:
    name = str(name).replace("\\", "/")
    return str(Path(name).with_suffix("")).replace("\\", "/") if is_image_name(name) else name


def _with_ext(name: str) -> str:
    return name if is_image_name(name) else name + ".jpg"


def _base_junk(q: Query) -> list[int]:
    """The revisited ``junk`` list before a protocol added easy or hard images to it.

    Easy, hard and junk are disjoint in revisited ground truth, so removing easy and hard from
    the protocol's junk recovers it whatever the protocol was.
    """
    extra = set(q.easy or []) | set(q.hard or [])
    return [j for j in q.junk if j not in extra]


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted '/'-separated relative paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "not a folder")
    return sorted(p.relative_to(folder).as_posix() for p in files.list_images(folder))


class _Resolver:
    """Maps ground-truth image names (usually without extension) to paths under an image folder."""

    def __init__(self, root: Path | None, source: str | Path):
        self.root = root
        self.source = source
        self._by_stem: dict[str, str | None] | None = None

    def _stem_index(self) -> dict[str, str | None]:
        if self._by_stem is None:
            index: dict[str, str | None] = {}
            for rel in list_images(self.root):
                stem = Path(rel).stem
                # None marks a stem present in two folders: ambiguous, resolved only by full path.
                index[stem] = None if stem in index else rel
            self._by_stem = index
        return self._by_stem

    def _one(self, name: str) -> str | None:
        name = str(name).replace("\\", "/")
        if self.root is None:
            return _with_ext(name)
        for candidate in (name, name + ".jpg"):
            if is_image_name(candidate) and (self.root / candidate).is_file():
                return candidate
        return self._stem_index().get(Path(_strip_image_ext(name)).name)

    def __call__(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        resolved = [self._one(n) for n in names]
        missing = [n for n, r in zip(names, resolved, strict=True) if r is None]
        if missing:
            raise DatasetError(
                self.root,
                f"{len(missing)} of {len(names)} images named in {self.source} are missing or "
                f"ambiguous under this folder, e.g. {missing[:3]}",
            )
        return resolved  # type: ignore[return-value]


def _read_lines(path: Path, comments: bool = False) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"cannot read as text: {e}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not (comments and line.startswith("#"))]


def _index_of(names: Sequence[str], path: Path) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in index:
            raise DatasetError(path, f"image {n!r} is listed twice in the database")
        index[n] = i
    return index


def _lookup(index: dict[str, int], names: Iterable[str], path: Path, what: str) -> list[int]:
    out, missing = [], []
    for n in names:
        if n in index:
            out.append(index[n])
        else:
            missing.append(n)
    if missing:
        raise DatasetError(
            path, f"{what} names {len(missing)} images not in the database, e.g. {missing[:3]}"
        )
    return out


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(path, f"not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(path, "JSON top level must be an object")
    return data


def _bbox_or_none(value, path: Path, where: str) -> BBox | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        return None
    if arr.size != 4:
        raise DatasetError(path, f"{where}: bbx must have 4 values (x1 y1 x2 y2), got {arr.size}")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- Oxford / Paris


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
        lines = _read_lines(qf)
        tokens = lines[0].split() if lines else []
        if len(tokens) != 5:
            raise DatasetError(qf, "expected one line '<image> x1 y1 x2 y2'")
        try:
            bbox = tuple(float(t) for t in tokens[1:])
        except ValueError:
            raise DatasetError(qf, f"bounding box is not numeric: {tokens[1:]}") from None
        image = tokens[0].removeprefix("oxc1_")
        labels = {k: _read_lines(gt_dir / f"{qname}_{k}.txt") for k in ("good", "ok", "junk")}
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
        db = [_with_ext(s) for s in stems]
    index = _index_of(stems, image_dir or gt_dir)

    queries = []
    for qname, image, bbox, labels in raw:
        where = gt_dir / f"{qname}_*.txt"
        (qidx,) = _lookup(index, [image], where, "query")
        queries.append(
            Query(
                name=qname,
                image=db[qidx],
                bbox=bbox,
                positives=_lookup(index, labels["good"] + labels["ok"], where, "good/ok"),
                junk=_lookup(index, labels["junk"], where, "junk"),
                image_index=qidx,
                category=qname.rsplit("_", 1)[0],
            )
        )
    return RetrievalBenchmark(
        name=name or gt_dir.name, root=image_dir, db_images=db, queries=queries
    )


# ----------------------------------------------------------------------------- MATLAB gnd


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

    index = _index_of(names, path)
    resolve = _Resolver(Path(root) if root is not None else None, path)
    rel = resolve(names)
    queries = []
    for i, g in enumerate(gnd):
        qi = int(q_idx[i]) - base if q_idx is not None else index.get(q_names[i])  # type: ignore[index]
        qname = q_names[i] if q_names is not None else names[qi]  # type: ignore[index]
        image = rel[qi] if qi is not None else resolve([qname])[0]
        bbox = _bbox_or_none(g["bbx"], path, f"query {i}") if "bbx" in gnd.dtype.names else None
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


# ----------------------------------------------------------------------------- pickles


def read_gnd_pkl(
    path: str | Path,
    root: str | Path | None = None,
    protocol: str | None = None,
    name: str | None = None,
) -> RetrievalBenchmark:
    """cirtorch / revisitop ground-truth pickle: ``{'imlist', 'qimlist', 'gnd'}`` (0-based).

    ``gnd[i]`` has ``ok``/``junk`` (Oxford5k / Paris6k style) or ``easy``/``hard``/``junk``
    (revisited Oxford / Paris), plus optional ``bbx``. Revisited ground truth is read under
    ``protocol`` easy / medium (default) / hard; a file with both ``ok`` and ``easy``/``hard`` is
    read from ``ok`` unless a protocol is given. Pickles can run code when loaded: only read
    files you trust.
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
    if revisited and (protocol is not None or not classic):
        protocol = normalize_protocol(protocol or "medium")
    elif classic:
        if protocol not in (None, "standard"):
            raise DatasetError(
                path, f"protocol {protocol!r} needs easy/hard lists; this file has ok/junk"
            )
        protocol = "standard"
    elif gnd:
        raise DatasetError(path, "gnd entries need 'ok' or 'easy' and 'hard'")
    else:
        protocol = "standard"

    resolve = _Resolver(Path(root) if root is not None else None, path)
    rel, q_rel = resolve([str(n) for n in imlist]), resolve([str(q) for q in qimlist])
    index = {str(n): i for i, n in enumerate(imlist)}
    n = len(imlist)
    queries = []
    for i, (qn, g) in enumerate(zip(qimlist, gnd, strict=True)):
        where = f"gnd[{i}]"
        if protocol == "standard":
            ok, junk, easy, hard = g["ok"], g.get("junk", []), None, None
        else:
            easy, hard = _int_list(g["easy"]), _int_list(g["hard"])
            split = revisited_gnd(g, protocol)
            ok, junk = split["ok"], split["junk"]
        ok, junk = _int_list(ok), _int_list(junk)
        bad = [k for k in ok + junk + (easy or []) + (hard or []) if not 0 <= k < n]
        if bad:
            raise DatasetError(path, f"{where}: indices outside 0..{n - 1}: {bad[:5]}")
        queries.append(
            Query(
                name=str(qn),
                image=q_rel[i],
                bbox=_bbox_or_none(g.get("bbx"), path, where),
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


def _int_list(x) -> list[int]:
    return np.asarray(x if x is not None else [], dtype=np.int64).reshape(-1).tolist()


# ----------------------------------------------------------------------------- lists


def read_image_list(path: str | Path) -> list[str]:
    """Image names, one per line (blank lines and '#' comments ignored): R1M / Flickr100k lists."""
    path = Path(path)
    names = _read_lines(path, comments=True)
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
    extra = [_with_ext(str(n)) for n in names]
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
    for lineno, line in enumerate(_read_lines(path, comments=True), 1):
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
        out[_strip_image_ext(parts[0])] = degrees % 360
    return out


# ----------------------------------------------------------------------------- Holidays


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
    for lineno, line in enumerate(_read_lines(perfect_result), 1):
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
    index = _index_of(db, source)
    rel = _Resolver(Path(root) if root is not None else None, source)(db)
    queries = []
    for g in groups:
        idx = _lookup(index, g, perfect_result, f"group of {g[0]}")
        queries.append(
            Query(
                name=_strip_image_ext(g[0]),
                image=rel[idx[0]],
                positives=idx[1:],
                junk=[idx[0]],
                image_index=idx[0],
            )
        )
    return RetrievalBenchmark(
        name=name, root=root, db_images=rel, queries=queries, rotations=dict(rotations or {})
    )


# ----------------------------------------------------------------------------- UKBench / SMVS

_UKBENCH_RE = re.compile(r"ukbench(\d{5})$", re.IGNORECASE)


def read_ukbench(image_dir: str | Path, protocol: str = "ns") -> RetrievalBenchmark:
    """UKBench: ``ukbenchNNNNN.jpg``, object ``NNNNN // 4`` (groups of 4 consecutive images).

    Every image queries the whole database. ``ns`` (default): positives = the 4 images of its
    group, itself included, as the N-S score counts it. ``loo``: positives = the 3 others and the
    query itself is junk.
    """
    image_dir = Path(image_dir)
    if protocol not in UKBENCH_PROTOCOLS:
        raise ValueError(f"unknown UKBench protocol {protocol!r}; use one of {UKBENCH_PROTOCOLS}")
    db, ids = [], []
    for rel in list_images(image_dir):
        match = _UKBENCH_RE.match(Path(rel).stem)
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
                positives=same if protocol == "ns" else [j for j in same if j != i],
                junk=[] if protocol == "ns" else [i],
                image_index=i,
                category=f"{g:05d}",
            )
        )
    return RetrievalBenchmark(
        name="ukbench", root=image_dir, db_images=db, queries=queries, protocol=protocol
    )


def ukbench_groups(benchmark: RetrievalBenchmark) -> np.ndarray:
    """(n_db,) object ids of a UKBench benchmark, for :func:`selret.evaluation.metrics.ukbench_ns_score`."""
    ids = [_UKBENCH_RE.match(Path(p).stem) for p in benchmark.db_images]
    if not all(ids):
        raise ValueError(f"{benchmark.name}: not every database image is named ukbenchNNNNN")
    return np.array([int(m.group(1)) // 4 for m in ids])  # type: ignore[union-attr]


def read_smvs(root: str | Path, groups_file: str = "groups.json") -> RetrievalBenchmark:
    """Stanford Mobile Visual Search (one category) from a ``groups.json``.

    ``groups`` maps an object id to its image paths (relative to ``root``); the one under
    ``Reference/`` is the database image, the others (one folder per phone) are queries with that
    single positive. ``Query.category`` is the phone folder, for per-phone reports.
    """
    root = Path(root)
    path = root / groups_file if root.is_dir() else root
    root = path.parent
    data = _load_json(path)
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
            name=_strip_image_ext(p),
            image=p,
            positives=[ref],
            category=p.split("/")[0] if "/" in p else None,
        )
        for p, ref in pending
    ]
    return RetrievalBenchmark(name="smvs", root=root, db_images=db, queries=queries)


# ----------------------------------------------------------------------------- paris6k-250


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
    data = _load_json(path)
    if not {"images", "queries", "image_labels"} <= set(data):
        raise DatasetError(path, "expected keys images, queries, image_labels")
    root = Path(root) if root is not None else path.parent
    names = [str(n) for n in data["images"]]
    index = _index_of(names, path)
    rel = _Resolver(root, path)(names)

    queries = []
    if protocol == "official-12":
        for q in data["queries"]:
            if not q.get("query_in_subset"):
                continue
            where = f"query {q.get('name')}"
            (qi,) = _lookup(index, [q["query_image"]], path, where)
            queries.append(
                Query(
                    name=q["name"],
                    image=rel[qi],
                    bbox=_bbox_or_none(q.get("bbx"), path, where),
                    positives=_lookup(index, q.get("ok", []), path, where),
                    junk=_lookup(index, q.get("junk", []), path, where),
                    image_index=qi,
                    category=q["name"].rsplit("_", 1)[0],
                )
            )
    else:
        labels = data["image_labels"]
        _lookup(index, labels, path, "image_labels")
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


# ----------------------------------------------------------------------------- folders


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
            name=_strip_image_ext(db[i]),
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


# ----------------------------------------------------------------------------- writing / JSON


def write_gnd(benchmark: RetrievalBenchmark, path: str | Path) -> Path:
    """Save a benchmark's ground truth; the format follows the suffix.

    ``.json``: selret's own format (every field, 0-based indices; :func:`read_benchmark_json`).
    ``.pkl``: the revisitop pickle ``{'imlist', 'qimlist', 'gnd'}``; names lose a ``.jpg``
    extension (revisitop adds it back). Revisited queries write ``easy``/``hard``/``junk``; other
    queries write ``ok``/``junk`` plus ``easy = ok`` and ``hard = []`` so that revisitop-style code
    sees the positives under Easy and Medium (Hard then has no positives).
    """
    path = Path(path)
    if path.suffix == ".json":
        payload = {
            "format": JSON_FORMAT,
            "version": 1,
            "name": benchmark.name,
            "protocol": benchmark.protocol,
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
        data = json.dumps(payload, indent=1).encode("utf-8")
    elif path.suffix == ".pkl":

        def bare(p: str) -> str:
            return p[: -len(".jpg")] if p.lower().endswith(".jpg") else p

        gnd = []
        for q in benchmark.queries:
            if q.is_revisited:
                g = {"easy": list(q.easy), "hard": list(q.hard), "junk": _base_junk(q)}
            else:
                g = {
                    "ok": list(q.positives),
                    "junk": list(q.junk),
                    "easy": list(q.positives),
                    "hard": [],
                }
            if q.bbox is not None:
                g["bbx"] = list(q.bbox)
            gnd.append(g)
        payload = {
            "imlist": [bare(p) for p in benchmark.db_images],
            "qimlist": [bare(q.image) for q in benchmark.queries],
            "gnd": gnd,
        }
        data = pickle.dumps(payload, protocol=4)
    else:
        raise ValueError(f"{path}: write_gnd writes .json or .pkl, not {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written ground truth
    return path


def read_benchmark_json(path: str | Path, root: str | Path | None = None) -> RetrievalBenchmark:
    """A benchmark written by :func:`write_gnd` as JSON; ``root`` overrides the stored root."""
    path = Path(path)
    data = _load_json(path)
    if data.get("format") != JSON_FORMAT:
        raise DatasetError(path, f"not a {JSON_FORMAT} JSON file (format={data.get('format')!r})")
    try:
        queries = [
            Query(
                name=q["name"],
                image=q["image"],
                bbox=q.get("bbx"),
                positives=q["ok"],
                junk=q.get("junk", []),
                easy=q.get("easy"),
                hard=q.get("hard"),
                image_index=q.get("image_index"),
                category=q.get("category"),
            )
            for q in data["queries"]
        ]
        return RetrievalBenchmark(
            name=data["name"],
            root=root if root is not None else data.get("root"),
            db_images=data["images"],
            queries=queries,
            protocol=data.get("protocol", "standard"),
            rotations={str(k): int(v) for k, v in (data.get("rotations") or {}).items()},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(path, f"malformed benchmark: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- dispatcher


def _find_file(root: Path, candidates: Sequence[str]) -> Path | None:
    """First existing ``candidates`` in ``root`` or ``root/<any subfolder>`` (case-insensitive)."""
    wanted = [c.lower() for c in candidates]
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        files = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
        for c in wanted:
            if c in files:
                return files[c]
    return None


def _image_folder(root: Path) -> Path | None:
    """``root/jpg`` if it exists, else ``root``; None when that folder holds no image at all
    (ground truth without images: names are kept as they are)."""
    folder = root / "jpg" if (root / "jpg").is_dir() else root
    for _, _, filenames in os.walk(folder):
        if any(is_image_name(f) for f in filenames):
            return folder
    return None


def _gt_folder(root: Path) -> Path | None:
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        if any(folder.glob("*_query.txt")):
            return folder
    return None


def _load_named(name: str, root: Path, protocol: str | None) -> RetrievalBenchmark:
    if not root.is_dir():
        raise DatasetError(root, f"dataset folder for {name} not found")
    images = _image_folder(root)
    if name in ("oxford5k", "paris6k", "oxford105k", "paris106k"):
        f = _find_file(root, [f"gnd_{name}.pkl", f"gnd_{name}.mat"])
        if f is not None:
            return (
                read_gnd_pkl(f, images, name=name)
                if f.suffix == ".pkl"
                else read_gnd_mat(f, images, name=name)
            )
        gt = _gt_folder(root) if name in ("oxford5k", "paris6k") else None
        if gt is not None:
            return read_oxford_gt(gt, images, name=name)
        raise DatasetError(root, f"no gnd_{name}.pkl/.mat or *_query.txt ground truth found")
    if name in ("roxford5k", "rparis6k"):
        f = _find_file(root, [f"gnd_{name}.pkl"])
        if f is None:
            raise DatasetError(root, f"gnd_{name}.pkl not found")
        return read_gnd_pkl(f, images, protocol=protocol or "medium", name=name)
    if name == "holidays":
        f = _find_file(root, ["perfect_result.dat", "perfect_result_derived.dat"])
        if f is not None:
            return read_holidays(f, _find_file(root, ["holidays_images.dat"]), images)
        f = _find_file(root, ["gnd_holidays.mat"])
        if f is None:
            raise DatasetError(root, "no perfect_result.dat or gnd_holidays.mat found")
        return read_gnd_mat(f, images, name="holidays")
    if name == "ukbench":
        if images is None:
            raise DatasetError(root, "no UKBench images in this folder")
        return read_ukbench(images, protocol=protocol or "ns")
    if name == "smvs":
        return read_smvs(root)
    if name == "paris6k-250":
        return read_paris6k_250(root, protocol=protocol or "official-12")
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")


def load_benchmark(
    name_or_path: str | Path, root: str | Path | None = None, protocol: str | None = None
) -> RetrievalBenchmark:
    """Load a benchmark by name or from a ground-truth file or folder.

    By name (:data:`BENCHMARK_NAMES`), ``root`` is the dataset folder holding the ground truth
    (in it or one sub-folder down) and the images (``root/jpg`` if present, else ``root``).
    By path: ``.json`` (selret, paris6k-250 ``ground_truth.json`` or SMVS ``groups.json``),
    ``.pkl``, ``.mat``, ``.dat`` (Holidays perfect_result), or a folder (SMVS, paris6k-250,
    Oxford-style gt, UKBench, or else folder-per-object); ``root`` is then the image folder.
    ``protocol``: easy/medium/hard for revisited sets, official-12/loo for paris6k-250,
    ns/loo for UKBench.
    """
    key = str(name_or_path).lower()
    if key in BENCHMARK_NAMES and not Path(name_or_path).exists():
        if root is None:
            raise ValueError(f"load_benchmark({key!r}) needs root, the dataset folder")
        return _load_named(key, Path(root), protocol)
    path = Path(name_or_path)
    if not path.exists():
        raise DatasetError(
            path, f"no such file or folder, and not a benchmark name ({', '.join(BENCHMARK_NAMES)})"
        )
    if path.is_dir():
        if (path / "groups.json").is_file():
            return read_smvs(path)
        if (path / "ground_truth.json").is_file():
            return read_paris6k_250(path, root, protocol=protocol or "official-12")
        if any(path.glob("*_query.txt")):
            return read_oxford_gt(path, root)
        images = list_images(path)
        if images and all(_UKBENCH_RE.match(Path(p).stem) for p in images):
            return read_ukbench(path, protocol=protocol or "ns")
        return read_object_folders(path)
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        return read_gnd_pkl(path, root, protocol=protocol)
    if suffix == ".mat":
        return read_gnd_mat(path, root)
    if suffix == ".dat":
        lst = path.parent / "holidays_images.dat"
        return read_holidays(path, lst if lst.is_file() else None, root)
    if suffix == ".json":
        data = _load_json(path)
        if data.get("format") == JSON_FORMAT:
            return read_benchmark_json(path, root)
        if "image_labels" in data:
            return read_paris6k_250(path, root, protocol=protocol or "official-12")
        if "groups" in data:
            return read_smvs(path)
        raise DatasetError(
            path, "JSON is neither a selret benchmark, a paris6k-250 ground truth nor SMVS groups"
        )
    raise DatasetError(path, f"unsupported ground-truth file type {path.suffix!r}")


__all__ = [
    "BENCHMARK_NAMES",
    "DatasetError",
    "Query",
    "REVISITED_PROTOCOLS",
    "RetrievalBenchmark",
    "add_distractors",
    "list_images",
    "load_benchmark",
    "read_benchmark_json",
    "read_gnd_mat",
    "read_gnd_pkl",
    "read_holidays",
    "read_image_list",
    "read_object_folders",
    "read_oxford_gt",
    "read_paris6k_250",
    "read_rotation_list",
    "read_smvs",
    "read_ukbench",
    "ukbench_groups",
    "write_gnd",
]
