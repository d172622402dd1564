"""Evaluation runs: one method on one retrieval benchmark, end to end, with a report.

    benchmark (selret.evaluation.datasets) + learning set --prepare--> EvalData (conv maps in the feature cache)
    EvalData + method (Encoder | BaselineEncoder) --run--> EvalReport (mAP, per-query AP, times)

:func:`prepare` extracts (or finds in the cache) the conv maps of the database, of the queries
(cropped by their box) and of the learning set, after checking that the learning set shares no
image with the evaluated ones. :func:`run` fits the method on the learning set when it needs it,
encodes database and queries, ranks by inner product and scores with :mod:`selret.evaluation.metrics`.
One ``EvalData`` serves any number of methods, which is how :mod:`selret.evaluation.experiments` runs a grid.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selret.encoding.encoder import Encoder
from selret.encoding.masks import compute_mask
from selret.errors import SelretError
from selret.evaluation.baselines import BASELINES, PCAWhitening, compute_baseline
from selret.evaluation.datasets import RetrievalBenchmark, ukbench_groups
from selret.evaluation.metrics import (
    compute_map,
    compute_map_revisited,
    mean_by_group,
    rank_by_inner_product,
    topk_accuracy,
    ukbench_ns_score,
)
from selret.features import FeatureMap
from selret.files import IMAGE_EXTENSIONS

KAPPAS = (1, 5, 10)
# Per-group tables (phone, landmark) are kept readable: more groups than this are left out.
MAX_GROUPS = 20
# Ranked database indices kept per query in the JSON report.
TOP_KEPT = 10


class LearningSetOverlapError(SelretError, ValueError):
    """The learning set shares images with the evaluated ones (database or queries)."""

    def __init__(self, overlap: Sequence[Path], n_learn: int):
        self.overlap = [Path(p) for p in overlap]
        super().__init__(
            f"the learning set shares {len(self.overlap)} of its {n_learn} images with the evaluated "
            f"images, e.g. {[str(p) for p in self.overlap[:3]]}; every learned parameter must come "
            "from held-out images"
        )


# --------------------------------------------------------------------------- learning sets


def image_paths(sources: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``sources``: folders (recursive), list files, or image files."""
    from selret.files import list_images

    out: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        out.extend([p] if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS else list_images(p))
    return out


def source_name(sources: Sequence[str | Path]) -> str:
    """A short name for a learning set: its folders' names joined by ' + '.

    The generic folder names of the data sets here (``jpg``, ``Reference``) get their parent's
    name in front, so ``.../ukbench-56/jpg`` reads ``ukbench-56/jpg``.
    """
    names = []
    for src in sources:
        p = Path(src).expanduser().resolve()
        generic = p.name.lower() in ("jpg", "jpeg", "images", "reference", "references", "db")
        names.append(f"{p.parent.name}/{p.name}" if generic else p.name)
    return " + ".join(names)


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    resolved = path.expanduser().resolve()
    try:
        st = resolved.stat()
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return str(resolved), inode


def check_disjoint(learn: Sequence[str | Path], evaluated: Sequence[str | Path]) -> None:
    """Raise :class:`LearningSetOverlapError` if a learning image is also an evaluated image.

    Two paths are the same image when they resolve to the same file (symlinks, ``..``) or are
    hard links of one file (same device and inode).
    """
    paths, inodes = set(), set()
    for p in evaluated:
        path, inode = _identity(Path(p))
        paths.add(path)
        if inode is not None:
            inodes.add(inode)
    overlap = []
    for p in learn:
        path, inode = _identity(Path(p))
        if path in paths or (inode is not None and inode in inodes):
            overlap.append(Path(p))
    if overlap:
        raise LearningSetOverlapError(overlap, len(learn))


# --------------------------------------------------------------------------- baselines


class BaselineEncoder:
    """A baseline global descriptor (SPoC, MAC, GeM, R-MAC, CroW) with the ``Encoder`` interface.

    ``fit(maps)`` learns the optional PCA-whitening (:class:`selret.evaluation.baselines.PCAWhitening`) on a
    held-out set; without ``whiten`` there is nothing to learn. ``dim`` is the whitened dimension
    (None: the channels K, capped at N - 1 learning images, the components whitening can learn).
    ``params`` go to the baseline function (e.g. ``centering=False`` for plain sum pooling).
    ``weights`` / ``layer`` / ``max_side`` say which conv maps it takes.
    """

    def __init__(
        self,
        name: str,
        whiten: bool = False,
        dim: int | None = None,
        weights: str = "vgg16-caffe",
        layer: str = "pool5",
        max_side: int = 1024,
        label: str | None = None,
        **params,
    ):
        if name.lower() not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
        self.name = name.lower()
        self.whiten = bool(whiten)
        self.dim_ = dim
        self.weights, self.layer, self.max_side = weights, layer, int(max_side)
        self.params = params
        self.label = label or (self.name + ("+PCAw" if self.whiten else ""))
        self.whitening_: PCAWhitening | None = None
        self.n_train_images_ = 0
        self.kept_fraction_ = 1.0
        self._channels: int | None = None

    @property
    def needs_fit(self) -> bool:
        return self.whiten and self.whitening_ is None

    @property
    def dim(self) -> int | None:
        """Output dimension (None until the channel count is known)."""
        if self.whitening_ is not None:
            return self.whitening_.dim or self._channels
        return self._channels

    def pool(self, fmap: FeatureMap) -> np.ndarray:
        """The (K,) l2-normalised baseline vector of one map, before any whitening."""
        self._channels = fmap.channels
        return compute_baseline(self.name, fmap, **self.params)

    def fit(self, maps: Sequence[FeatureMap], progress: bool = False) -> BaselineEncoder:
        if not self.whiten:
            return self
        X = np.stack([self.pool(f) for f in maps])
        if len(X) < 2:
            raise ValueError("PCA-whitening needs at least 2 learning images")
        dim = self.dim_ if self.dim_ is not None else min(X.shape[1], len(X) - 1)
        self.whitening_ = PCAWhitening(dim=dim).fit(X)
        self.n_train_images_ = len(X)
        return self

    def encode(self, fmap: FeatureMap) -> np.ndarray:
        v = self.pool(fmap)
        return v if self.whitening_ is None else self.whitening_.transform(v)

    def encode_many(self, maps, progress: bool = False) -> np.ndarray:
        return np.stack([self.encode(f) for f in maps])

    def describe(self) -> dict:
        return {
            "method": self.label,
            "weights": self.weights,
            "layer": self.layer,
            "max_side": self.max_side,
            "mask": "-",
            "embedding": self.name,
            "aggregation": "-",
            "whitening": "PCA-whitening" if self.whiten else "none",
        }

    def __repr__(self) -> str:
        return f"BaselineEncoder({self.label!r}, D={self.dim})"


def describe_encoder(encoder: Encoder, label: str | None = None) -> dict:
    """The report fields of an ``Encoder`` (what it is, not how well it does)."""
    c = encoder.config
    return {
        "method": label or c.preset or f"{c.embedding}+{c.aggregation}",
        "weights": c.weights,
        "layer": c.layer,
        "max_side": c.max_side,
        "mask": c.mask,
        "embedding": c.embedding,
        "aggregation": c.aggregation,
        "whitening": c.rotation,
        "d": c.d,
        "k": c.k,
        "alpha": c.alpha,
    }


def _needs_fit(method) -> bool:
    if isinstance(method, Encoder):
        return method.pca_ is None
    return bool(getattr(method, "needs_fit", False))


def _extraction(method) -> tuple[str, str, int]:
    if isinstance(method, Encoder):
        return method.config.weights, method.config.layer, method.config.max_side
    return method.weights, method.layer, method.max_side


def _mask_kind(method) -> str | None:
    return method.config.mask if isinstance(method, Encoder) else None


# --------------------------------------------------------------------------- data


class _QueryMaps(Sequence[FeatureMap]):
    """Query maps: a database map when the query is a full database image, else its own entry."""

    def __init__(
        self, db: Sequence[FeatureMap], own: Sequence[FeatureMap], where: list[tuple[bool, int]]
    ):
        self._db, self._own, self._where = db, own, where

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        in_db, j = self._where[i]
        return self._db[j] if in_db else self._own[j]


@dataclass
class EvalData:
    """Conv maps of a benchmark (database, queries) and of its learning set, at one extraction setting.

    ``db`` and ``queries`` align with ``benchmark.db_images`` / ``benchmark.queries``. ``learn`` is
    None without a learning set; ``learn_name`` names it; ``learn_paths`` are its images that
    were extracted. ``extract_seconds`` is the time spent extracting or finding the maps.
    """

    benchmark: RetrievalBenchmark
    weights: str
    layer: str
    max_side: int
    db: Sequence[FeatureMap]
    queries: Sequence[FeatureMap]
    learn: Sequence[FeatureMap] | None = None
    learn_name: str | None = None
    learn_paths: list[Path] = field(default_factory=list)
    learn_failed: list[tuple[str, str]] = field(default_factory=list)
    extract_seconds: float = 0.0


def _maps(
    paths,
    weights,
    layer,
    max_side,
    cache_dir,
    backbone,
    bboxes=None,
    rotations=None,
    progress=False,
):
    from selret.encoding.encoder import EncoderConfig
    from selret.features.maps import feature_maps_for

    config = EncoderConfig(weights=weights, layer=layer, max_side=max_side)
    return feature_maps_for(
        paths,
        config,
        cache_dir,
        backbone=backbone,
        bboxes=bboxes,
        rotations=rotations,
        progress=progress,
    )


def _require_all(maps, what: str) -> None:
    if maps.report.failed:
        path, reason = maps.report.failed[0]
        raise SelretError(
            f"{len(maps.report.failed)} {what} images could not be used (the benchmark needs all of "
            f"them), e.g. {path}: {reason}"
        )


def prepare(
    benchmark: RetrievalBenchmark,
    *,
    weights: str = "vgg16-caffe",
    layer: str = "pool5",
    max_side: int = 1024,
    learn: Sequence[str | Path] | None = None,
    learn_name: str | None = None,
    cache_dir: str | Path | None = None,
    backbone=None,
    device: str | None = None,
    preload: bool = False,
    progress: bool = False,
) -> EvalData:
    """Extract (or find in the cache) every conv map a run on ``benchmark`` needs.

    ``learn`` are learning-set images, folders or list files; they must be disjoint from the
    database and query images (:func:`check_disjoint`). Database and query images that fail
    to load are an error (the ground truth needs them); failed learning images are skipped and
    listed in ``learn_failed``. ``preload`` keeps every map in memory (for many runs on one set).
    """
    start = time.perf_counter()
    db_paths = [benchmark.image_path(i) for i in range(len(benchmark))]
    queries = benchmark.queries
    learn_paths = image_paths(learn) if learn else []
    if learn:
        if not learn_paths:
            raise ValueError(f"the learning set {[str(s) for s in learn]} holds no image")
        check_disjoint(learn_paths, db_paths + [benchmark.query_path(q) for q in queries])
    if backbone is None:
        from selret.features.backbones import load_backbone

        backbone = load_backbone(weights, layer, device=device)
    elif backbone.weights != weights or backbone.layer != layer:
        raise ValueError(f"backbone {backbone.id} is not {weights}:{layer}")

    def rotations(images):
        rots = [benchmark.rotation(im) for im in images]
        return rots if any(rots) else None

    common = dict(
        weights=weights,
        layer=layer,
        max_side=max_side,
        cache_dir=cache_dir,
        backbone=backbone,
        progress=progress,
    )
    db = _maps(db_paths, rotations=rotations(benchmark.db_images), **common)
    _require_all(db, "database")
    # A full-image query that is a database image (leave-one-out, UKBench) reuses its map.
    where: list[tuple[bool, int]] = []
    own: list[int] = []
    for i, q in enumerate(queries):
        if (
            q.bbox is None
            and q.image_index is not None
            and q.image == benchmark.db_images[q.image_index]
        ):
            where.append((True, q.image_index))
        else:
            where.append((False, len(own)))
            own.append(i)
    own_maps = _maps(
        [benchmark.query_path(queries[i]) for i in own],
        bboxes=[queries[i].bbox for i in own],
        rotations=rotations([queries[i].image for i in own]),
        **common,
    )
    _require_all(own_maps, "query")
    learn_maps = _maps(learn_paths, **common) if learn_paths else None
    db_seq: Sequence[FeatureMap] = list(db) if preload else db
    own_seq: Sequence[FeatureMap] = list(own_maps) if preload else own_maps
    learn_seq = (list(learn_maps) if preload else learn_maps) if learn_maps is not None else None
    return EvalData(
        benchmark=benchmark,
        weights=weights,
        layer=layer,
        max_side=max_side,
        db=db_seq,
        queries=_QueryMaps(db_seq, own_seq, where),
        learn=learn_seq,
        learn_name=(learn_name or source_name(learn)) if learn else None,
        learn_paths=list(learn_maps.paths) if learn_maps is not None else [],
        learn_failed=list(learn_maps.report.failed) if learn_maps is not None else [],
        extract_seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- report


def _num(x) -> float | None:
    """A JSON-safe float (NaN -> None)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


@dataclass
class EvalReport:
    """Everything one run measured. Fractions are in [0, 1]; times in seconds.

    ``ranks`` (n_db, n_q) is kept in memory for contact sheets; the JSON keeps the first
    ``TOP_KEPT`` database indices of each query.
    """

    dataset: str
    protocol: str
    n_db: int
    n_queries: int
    method: dict
    dim: int
    learning_set: dict
    map: float
    mp_at_k: dict[int, float]
    top1: float
    per_query: list[dict]
    kept_fraction: float
    times: dict[str, float]
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)
    ns_score: float | None = None
    revisited: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    ranks: np.ndarray | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return str(self.method.get("method"))

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "n_db": self.n_db,
            "n_queries": self.n_queries,
            **{k: v for k, v in self.method.items()},
            "dim": self.dim,
            "learning_set": self.learning_set,
            "map": _num(self.map),
            "mp_at_k": {str(k): _num(v) for k, v in self.mp_at_k.items()},
            "top1": _num(self.top1),
            "ns_score": _num(self.ns_score),
            "revisited": None
            if self.revisited is None
            else {k: _num(v) for k, v in self.revisited.items()},
            "per_group": {g: {k: _num(v) for k, v in d.items()} for g, d in self.per_group.items()},
            "kept_fraction": _num(self.kept_fraction),
            "times": {k: round(v, 3) for k, v in self.times.items()},
            "notes": self.notes,
            "per_query": self.per_query,
        }

    def to_markdown(self) -> str:
        """A field/value table, then per-group figures when there are groups."""
        m = self.method
        learn = self.learning_set
        rows = [
            (
                "dataset",
                f"{self.dataset} ({self.protocol}): {self.n_db} database images, {self.n_queries} queries",
            ),
            ("method", m.get("method")),
            (
                "backbone",
                f"VGG16 ({m.get('weights')}), {m.get('layer')}, longest side {m.get('max_side')} px",
            ),
            (
                "mask / embedding / aggregation",
                f"{m.get('mask')} / {m.get('embedding')} / {m.get('aggregation')}",
            ),
            ("post-processing", m.get("whitening")),
            ("D", self.dim),
            ("learning set", f"{learn.get('name') or 'none'} ({learn.get('n_images', 0)} images)"),
            ("mAP", _pct(self.map)),
            (
                "mP@" + "/".join(str(k) for k in self.mp_at_k),
                " / ".join(_pct(v) for v in self.mp_at_k.values()),
            ),
            ("top-1 accuracy", _pct(self.top1)),
        ]
        if self.ns_score is not None:
            rows.append(("N-S score (of 4)", f"{self.ns_score:.2f}"))
        if self.revisited:
            rows.append(
                ("revisited E / M / H", " / ".join(_pct(v) for v in self.revisited.values()))
            )
        rows.append(("features kept by the mask", _pct(self.kept_fraction)))
        rows.append(
            (
                "time (s): extract / fit / encode / search",
                " / ".join(f"{self.times[k]:.1f}" for k in ("extract", "fit", "encode", "search")),
            )
        )
        lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
        if self.per_group:
            lines += ["", "| group | queries | mAP | top-1 |", "|---|---|---|---|"]
            for g, d in self.per_group.items():
                lines.append(f"| {g} | {int(d['n'])} | {_pct(d['map'])} | {_pct(d['top1'])} |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / "report.json", out / "report.md"
        _write_text(js, json.dumps(self.to_dict(), indent=1))
        _write_text(md, self.to_markdown())
        return js, md


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.1f}"


SUMMARY_COLUMNS = ("method", "mask", "D", "learning set", "mAP", "top-1", "N-S", "kept %")


def summary_row(report: EvalReport) -> dict:
    """The columns of :data:`SUMMARY_COLUMNS` for one report (fractions as percentages)."""
    return {
        "method": report.label,
        "mask": report.method.get("mask"),
        "D": report.dim,
        "learning set": f"{report.learning_set.get('name') or 'none'} ({report.learning_set.get('n_images', 0)})",
        "mAP": _pct(report.map),
        "top-1": _pct(report.top1),
        "N-S": "-" if report.ns_score is None else f"{report.ns_score:.2f}",
        "kept %": _pct(report.kept_fraction),
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of dict rows (columns: the given ones, or the first row's keys)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- running


def _encode(method, maps: Sequence[FeatureMap], mask: str | None) -> tuple[np.ndarray, list[float]]:
    vecs, kept = [], []
    for fmap in maps:
        vecs.append(method.encode(fmap))
        kept.append(float(compute_mask(mask, fmap).mean()) if mask else 1.0)
    return np.stack(vecs).astype(np.float32), kept


def encode_data(method, data: EvalData) -> tuple[np.ndarray, np.ndarray, float]:
    """(database vectors, query vectors, mean fraction of database features the mask kept)
    of a fitted ``method``."""
    db_vecs, kept = _encode(method, data.db, _mask_kind(method))
    q_vecs, _ = _encode(method, data.queries, _mask_kind(method))
    return db_vecs, q_vecs, float(np.mean(kept))


def score(benchmark: RetrievalBenchmark, ranks: np.ndarray, kappas: Sequence[int] = KAPPAS) -> dict:
    """Every metric of ``benchmark`` for (n_db, n_q) ``ranks``: mAP, mP@k, per-query AP,
    top-1 accuracy, per-group mAP / top-1 (when the queries have at most ``MAX_GROUPS``
    categories), the N-S score for UKBench and Easy/Medium/Hard mAP for revisited ground truth."""
    queries = benchmark.queries
    result = compute_map(ranks, benchmark.gnd(), kappas)
    positives = [q.positives for q in queries]
    junk = [q.junk for q in queries]
    hits = np.array(
        [topk_accuracy(ranks[:, [i]], [positives[i]], 1, [junk[i]]) for i in range(len(queries))]
    )
    out = {
        "map": result.map,
        "aps": result.aps,
        "mp_at_k": {k: float(v) for k, v in zip(kappas, result.mpr, strict=True)},
        "top1": topk_accuracy(ranks, positives, 1, junk),
        "top1_per_query": hits,
        "per_group": {},
        "ns_score": None,
        "revisited": None,
    }
    cats = [q.category for q in queries]
    if all(c is not None for c in cats) and 1 < len(set(cats)) <= MAX_GROUPS:
        maps_g = mean_by_group(result.aps, cats)
        top1_g = mean_by_group(hits, cats)
        counts = {c: cats.count(c) for c in maps_g}
        out["per_group"] = {
            c: {"n": counts[c], "map": maps_g[c], "top1": top1_g[c]} for c in maps_g
        }
    if benchmark.name == "ukbench":
        groups = ukbench_groups(benchmark)
        out["ns_score"] = ukbench_ns_score(ranks, groups, groups[[q.image_index for q in queries]])
    if queries and all(q.is_revisited for q in queries):
        rev = compute_map_revisited(ranks, benchmark.gnd(revisited=True), kappas=kappas)
        out["revisited"] = {k: v.map for k, v in rev.items()}
    return out


def run(
    data: EvalData,
    method,
    label: str | None = None,
    progress: bool = False,
    fitted_on_learn: bool = False,
) -> EvalReport:
    """Fit ``method`` on ``data.learn`` if it needs fitting, encode, rank and score.

    ``method`` is an :class:`~selret.encoding.encoder.Encoder` (fitted, e.g. loaded from a file, or not)
    or a :class:`BaselineEncoder`. Its extraction setting (weights, layer, image size) must be
    the one ``data`` was extracted with. ``fitted_on_learn`` says that a fitted ``method`` was
    fitted on ``data.learn`` (e.g. reloaded from an earlier run), so the report names that
    learning set, which ``prepare`` checked, instead of an unknown one.
    """
    bench = data.benchmark
    if _extraction(method) != (data.weights, data.layer, data.max_side):
        raise ValueError(
            f"the method takes {_extraction(method)} maps (weights, layer, size) but the data holds "
            f"{(data.weights, data.layer, data.max_side)}"
        )
    notes: list[str] = []
    times = {"extract": data.extract_seconds, "fit": 0.0}
    fit_here = _needs_fit(method)
    if fit_here:
        if data.learn is None or len(data.learn) == 0:
            raise ValueError(f"{method!r} must be fitted and no learning set was given")
        t = time.perf_counter()
        method.fit(data.learn, progress=progress)
        times["fit"] = time.perf_counter() - t
    if fit_here or (fitted_on_learn and data.learn is not None):
        learning = {"name": data.learn_name, "n_images": len(data.learn), "disjoint_checked": True}
        if not fit_here:
            notes.append("the fit on this learning set was reused from an earlier run")
    elif isinstance(method, Encoder):
        learning = {
            "name": "fitted encoder (learning set not recorded)",
            "n_images": method.n_train_images_,
            "disjoint_checked": False,
        }
        notes.append(
            "the encoder was fitted elsewhere: its learning set could not be checked for overlap"
        )
    elif getattr(method, "whitening_", None) is not None:
        learning = {
            "name": "pre-fitted whitening",
            "n_images": method.n_train_images_,
            "disjoint_checked": False,
        }
    else:
        learning = {"name": None, "n_images": 0, "disjoint_checked": True}
    if data.learn_failed:
        notes.append(f"{len(data.learn_failed)} learning images could not be read and were skipped")

    t = time.perf_counter()
    db_vecs, q_vecs, kept = encode_data(method, data)
    times["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    ranks = rank_by_inner_product(q_vecs, db_vecs)
    metrics = score(bench, ranks)
    times["search"] = time.perf_counter() - t

    if isinstance(method, Encoder):
        describe = describe_encoder(method, label)
        rot = method.rotation_
        if rot is not None and rot.n_components_ < method.config.embedding_dim:
            learning["rotation_components"] = int(rot.n_components_)
            notes.append(
                f"rotation learned {rot.n_components_} of {method.config.embedding_dim} components "
                f"(N = {method.n_train_images_} learning images); the rest completes the basis"
            )
        learning["kept_fraction"] = _num(method.kept_fraction_)
    else:
        describe = method.describe() | ({"method": label} if label else {})
    per_query = [
        {
            "name": q.name,
            "category": q.category,
            "ap": _num(ap),
            "top1": _num(hit),
            "top": ranks[:TOP_KEPT, i].tolist(),
        }
        for i, (q, ap, hit) in enumerate(
            zip(bench.queries, metrics["aps"], metrics["top1_per_query"], strict=True)
        )
    ]
    return EvalReport(
        dataset=bench.name,
        protocol=bench.protocol,
        n_db=len(bench),
        n_queries=len(bench.queries),
        method=describe,
        dim=int(db_vecs.shape[1]),
        learning_set=learning,
        map=metrics["map"],
        mp_at_k=metrics["mp_at_k"],
        top1=metrics["top1"],
        per_query=per_query,
        kept_fraction=kept,
        times=times,
        per_group=metrics["per_group"],
        ns_score=metrics["ns_score"],
        revisited=metrics["revisited"],
        notes=notes,
        ranks=ranks,
    )


def evaluate(
    benchmark: RetrievalBenchmark,
    method,
    learn: Sequence[str | Path] | None = None,
    learn_name: str | None = None,
    cache_dir: str | Path | None = None,
    backbone=None,
    device: str | None = None,
    label: str | None = None,
    progress: bool = False,
) -> EvalReport:
    """:func:`prepare` the maps ``method`` needs, then :func:`run` it: one call, one report."""
    weights, layer, max_side = _extraction(method)
    data = prepare(
        benchmark, weights=weights, layer=layer, max_side=max_side,
        learn=learn if _needs_fit(method) else None, learn_name=learn_name,
        cache_dir=cache_dir, backbone=backbone, device=device, progress=progress,
    )  # fmt: skip
    return run(data, method, label=label, progress=progress)


__all__ = [
    "BaselineEncoder",
    "EvalData",
    "EvalReport",
    "LearningSetOverlapError",
    "check_disjoint",
    "describe_encoder",
    "encode_data",
    "evaluate",
    "image_paths",
    "markdown_table",
    "prepare",
    "run",
    "score",
    "source_name",
    "summary_row",
]
