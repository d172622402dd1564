"""The paper's experiments as functions: each runs a grid of methods on one benchmark and returns an
:class:`ExperimentResult` (rows, a markdown table, JSON, and a figure via :mod:`selret.evaluation.plots`).

=============  ====================================================  ===================
experiment     what varies                                           paper
=============  ====================================================  ===================
frameworks     embedding + aggregation (FV, VLAD, T-emb, F-FAemb)     Table 3
               x mask
dims           final dimension D (T-emb + democratic presets) x mask  Figure 4
image-size     longest image side (724, 1024) x mask                  Table 5
layers         VGG16 layer (pool5, conv5_3 ... conv4_1) x mask        Figure 5
alpha          power-law exponent x mask                              Figure 3
masks          features kept and their correlation per mask, mAP      Figure 2 / sec. 3.3
baselines      SPoC, MAC, GeM, R-MAC, CroW vs the method              Table 6
=============  ====================================================  ===================

Every experiment takes a :class:`Setup` (benchmark, learning set disjoint from it, cache), which
extracts each (layer, image size) once and shares the maps between the runs of the grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.encoding.masks import MASKS, compute_mask
from selret.encoding.postprocessing import l2_normalize, power_law
from selret.encoding.presets import COMPARISON_4224
from selret.evaluation.datasets import RetrievalBenchmark
from selret.evaluation.metrics import rank_by_inner_product
from selret.evaluation.runs import (
    BaselineEncoder,
    EvalData,
    EvalReport,
    encode_data,
    image_paths,
    markdown_table,
    prepare,
    run,
    score,
    source_name,
)
from selret.files import file_digest

# Paper Table 3: framework -> EncoderConfig fields (the 4224-D settings of Table 2).
FRAMEWORKS: dict[str, dict] = {
    "FV+avg": {"embedding": "fv", "aggregation": "average"},
    "FV+demo": {"embedding": "fv", "aggregation": "democratic"},
    "VLAD+sum": {"embedding": "vlad", "aggregation": "sum"},
    "VLAD+demo": {"embedding": "vlad", "aggregation": "democratic"},
    "T-emb+demo": {"embedding": "temb", "aggregation": "democratic"},
    "F-FAemb+demo": {"embedding": "faemb", "aggregation": "democratic"},
}
for _fields in FRAMEWORKS.values():
    _fields["d"], _fields["k"] = COMPARISON_4224[_fields["embedding"]]

DIM_PRESETS = ("temb-demo-512", "temb-demo-1024", "temb-demo-2048", "temb-demo-4096")
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LAYERS = ("conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "pool5")
BASELINE_NAMES = ("spoc", "mac", "gem", "rmac", "crow")
# Histogram of local-feature correlations (cosine similarities lie in [-1, 1]).
CORRELATION_BINS = 100
MD_MAX_GROUPS = 8


@dataclass
class Setup:
    """What an experiment runs on: a benchmark, its held-out learning set and the extraction cache.

    ``learn`` are image paths (see :func:`make_setup` for folders and subsampling); ``base`` holds
    EncoderConfig fields applied to every encoder of the grid (e.g. ``kmeans_iters``).
    ``preload`` keeps the maps in memory between the runs. ``encoder_dir``, when set, keeps
    every fitted encoder there, named by a hash of its config and of the learning images'
    content, and reuses it in a later run with the same config and learning set (e.g. the
    two protocols of one benchmark).
    """

    benchmark: RetrievalBenchmark
    learn: list[Path]
    learn_name: str | None = None
    weights: str = "vgg16-caffe"
    layer: str = "pool5"
    max_side: int = 1024
    cache_dir: str | Path | None = None
    device: str | None = None
    base: dict = field(default_factory=dict)
    preload: bool = True
    progress: bool = False
    encoder_dir: str | Path | None = None
    _data: dict = field(default_factory=dict, repr=False)

    def data(self, layer: str | None = None, max_side: int | None = None) -> EvalData:
        """The maps at ``layer`` / ``max_side`` (default: the setup's), extracted once."""
        key = (layer or self.layer, int(max_side or self.max_side))
        if key not in self._data:
            self._data[key] = prepare(
                self.benchmark, weights=self.weights, layer=key[0], max_side=key[1],
                learn=self.learn, learn_name=self.learn_name, cache_dir=self.cache_dir,
                device=self.device, preload=self.preload, progress=self.progress,
            )  # fmt: skip
        return self._data[key]

    def config(self, preset: str | None = None, **fields) -> EncoderConfig:
        """An EncoderConfig at this setup's extraction setting: ``preset`` + ``base`` + ``fields``."""
        fields = (
            {"weights": self.weights, "layer": self.layer, "max_side": self.max_side}
            | self.base
            | fields
        )
        if preset is not None:
            return EncoderConfig.from_preset(preset, **fields)
        return EncoderConfig(**fields)

    def run_encoder(self, config: EncoderConfig, label: str | None = None) -> EvalReport:
        data = self.data(config.layer, config.max_side)
        if self.encoder_dir is None:
            return run(data, Encoder(config), label=label)
        path = Path(self.encoder_dir) / f"{fit_key(config, data.learn_paths)}.npz"
        if path.is_file():
            return run(data, Encoder.load(path), label=label, fitted_on_learn=True)
        encoder = Encoder(config)
        report = run(data, encoder, label=label)
        encoder.save(path)
        return report

    def run_baseline(
        self, name: str, whiten: bool = False, label: str | None = None, **params
    ) -> EvalReport:
        method = BaselineEncoder(
            name, whiten=whiten, weights=self.weights, layer=self.layer, max_side=self.max_side,
            label=label, **params,
        )  # fmt: skip
        return run(self.data(), method)

    def describe(self) -> dict:
        b = self.benchmark
        return {
            "dataset": b.name,
            "protocol": b.protocol,
            "n_db": len(b),
            "n_queries": len(b.queries),
            "learning_set": {"name": self.learn_name, "n_images": len(self.learn)},
            "weights": self.weights,
            "layer": self.layer,
            "max_side": self.max_side,
            "base": self.base,
        }


def fit_key(config: EncoderConfig, learn: Sequence[str | Path]) -> str:
    """sha1 naming a fit: the config and the content (sha256) of each learning image, in order."""
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode())
    for p in learn:
        digest.update(f"{file_digest(p)}\n".encode())
    return digest.hexdigest()


def make_setup(
    benchmark: RetrievalBenchmark,
    learn: Sequence[str | Path],
    max_learn: int | None = None,
    seed: int = 0,
    **kwargs,
) -> Setup:
    """A :class:`Setup` whose learning set is the images of ``learn`` (folders, list files,
    images), subsampled to ``max_learn`` with ``seed`` when given (to keep an experiment small)."""
    paths = image_paths(learn)
    name = source_name(learn)
    if max_learn is not None and len(paths) > max_learn:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), max_learn, replace=False))
        paths = [paths[i] for i in keep]
        name = f"{name} (random {max_learn})"
    return Setup(benchmark, paths, name, **kwargs)


# --------------------------------------------------------------------------- results


PERCENT_COLUMNS = ("mAP", "top-1", "kept %", "kept sd", "mean corr")


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in PERCENT_COLUMNS:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


@dataclass
class ExperimentResult:
    """Rows of one experiment (fractions in [0, 1]), the columns to show, and the setup."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict]
    setup: dict
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_markdown(self) -> str:
        s = self.setup
        learn = s["learning_set"]
        head = (
            f"### {self.title}\n\n{s['dataset']} ({s['protocol']}: {s['n_db']} database images, "
            f"{s['n_queries']} queries); VGG16 {s['weights']} {s['layer']}, longest side "
            f"{s['max_side']} px; learning set: {learn['name']} ({learn['n_images']} images).\n\n"
        )
        shown = [{c: _cell(c, r.get(c)) for c in self.columns} for r in self.rows]
        body = markdown_table(shown, self.columns)
        groups = [r for r in self.rows if r.get("per_group")]
        # A table of more groups than this is too wide to read; the JSON keeps them all.
        if groups and len(groups[0]["per_group"]) <= MD_MAX_GROUPS:
            names = list(groups[0]["per_group"])
            keys = [c for c in ("method", "framework", "mask", "D") if c in self.columns]
            extra = [
                {**{c: _cell(c, r.get(c)) for c in keys},
                 **{g: f"{_cell('mAP', r['per_group'][g]['map'])} / {_cell('mAP', r['per_group'][g]['top1'])}" for g in names}}
                for r in groups
            ]  # fmt: skip
            body += "\nPer group, mAP / top-1:\n\n" + markdown_table(extra, keys + names)
        return head + body

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``<name>.json``, ``<name>.md`` and the figure ``<name>.png`` into ``out_dir``."""
        from selret.evaluation.plots import plot_experiment

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, md, png = (out / f"{self.name}.{ext}" for ext in ("json", "md", "png"))
        js.write_text(json.dumps(self.to_dict(), indent=1, default=_json_default), encoding="utf-8")
        md.write_text(self.to_markdown(), encoding="utf-8")
        plot_experiment(self, png)
        return [js, md, png]


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _row(report: EvalReport, **keys) -> dict:
    """A result row: ``keys`` then the report's figures."""
    learn = report.learning_set
    return {
        **keys,
        "D": report.dim,
        "mAP": _nan_to_none(report.map),
        "top-1": _nan_to_none(report.top1),
        "N-S": report.ns_score,
        "kept %": report.kept_fraction,
        "learned comps": learn.get("rotation_components"),
        "fit s": round(report.times["fit"], 1),
        "per_group": report.per_group,
        "per_query_ap": [q["ap"] for q in report.per_query],
    }


def _metric_columns(setup: Setup) -> list[str]:
    cols = ["D", "mAP", "top-1"]
    if setup.benchmark.name == "ukbench":
        cols.append("N-S")
    return cols


def _result(
    name: str, title: str, setup: Setup, columns, rows, start: float, **extra
) -> ExperimentResult:
    return ExperimentResult(
        name, title, list(columns), rows, setup.describe(), extra, time.perf_counter() - start
    )


# --------------------------------------------------------------------------- experiments


def frameworks(
    setup: Setup, masks: Sequence[str] = MASKS, frameworks: dict[str, dict] | None = None
) -> ExperimentResult:
    """Paper Table 3: each embedding + aggregation framework with each mask.

    ``frameworks`` maps a label to EncoderConfig fields (default :data:`FRAMEWORKS`, the 4224-D
    settings; pass smaller d, k for a quick run).
    """
    start = time.perf_counter()
    rows = []
    for label, fields in (frameworks or FRAMEWORKS).items():
        for mask in masks:
            report = setup.run_encoder(setup.config(**fields, mask=mask), label=label)
            rows.append(_row(report, framework=label, mask=mask))
    cols = ["framework", "mask", *_metric_columns(setup), "fit s"]
    return _result(
        "frameworks",
        "Embedding and aggregation frameworks x masks (paper Table 3)",
        setup,
        cols,
        rows,
        start,
    )


def dimensions(
    setup: Setup,
    presets: Sequence[str] = DIM_PRESETS,
    masks: Sequence[str] = ("sift", "sum", "max"),
) -> ExperimentResult:
    """Paper Figure 4: mAP against the final dimension D (T-emb + democratic presets), per mask.

    ``learned comps`` is the number of rotation components learned from the N learning images
    (at most N - 1); below d * k, the rotation basis was completed (SPEC 6).
    """
    start = time.perf_counter()
    rows = []
    for mask in masks:
        for name in presets:
            report = setup.run_encoder(setup.config(name, mask=mask), label=name)
            rows.append(_row(report, preset=name, mask=mask))
    cols = ["mask", "preset", *_metric_columns(setup), "learned comps", "fit s"]
    return _result(
        "dims", "mAP against the final dimension D (paper Figure 4)", setup, cols, rows, start
    )


def image_sizes(
    setup: Setup,
    sizes: Sequence[int] = (724, 1024),
    masks: Sequence[str] = ("max",),
    preset: str = "temb-demo-512",
) -> ExperimentResult:
    """Paper Table 5: the longest image side (each size is extracted on its own)."""
    start = time.perf_counter()
    rows = []
    for size in sizes:
        for mask in masks:
            report = setup.run_encoder(
                setup.config(preset, mask=mask, max_side=int(size)), label=preset
            )
            rows.append(_row(report, size=int(size), mask=mask))
    cols = ["size", "mask", *_metric_columns(setup), "kept %"]
    return _result("image-size", f"Image size ({preset}; paper Table 5)", setup, cols, rows, start)


def layers(
    setup: Setup,
    layers: Sequence[str] = LAYERS,
    masks: Sequence[str] = ("max",),
    preset: str = "temb-demo-512",
) -> ExperimentResult:
    """Paper Figure 5: which VGG16 layer the local features come from (extracted per layer)."""
    start = time.perf_counter()
    rows = []
    for layer in layers:
        for mask in masks:
            report = setup.run_encoder(setup.config(preset, mask=mask, layer=layer), label=preset)
            rows.append(_row(report, layer=layer, mask=mask))
    cols = ["layer", "mask", *_metric_columns(setup), "kept %"]
    return _result(
        "layers",
        f"Layer of the local features ({preset}; paper Figure 5)",
        setup,
        cols,
        rows,
        start,
    )


def alphas(
    setup: Setup,
    alphas: Sequence[float] = ALPHAS,
    masks: Sequence[str] = ("max",),
    preset: str = "temb-demo-512",
) -> ExperimentResult:
    """Paper Figure 3: the power-law exponent alpha (1 = no power law), per mask.

    One encoder is fitted per mask (alpha is not learned). It encodes with alpha = 1, giving
    u = l2(drop(rotate(psi))); since l2(power_law(u, a)) equals the encoding with alpha = a
    (the power law is homogeneous, so the norm of u cancels), each alpha costs one ranking.
    """
    start = time.perf_counter()
    data = setup.data()
    rows = []
    for mask in masks:
        encoder = Encoder(setup.config(preset, mask=mask, alpha=1.0))
        t = time.perf_counter()
        encoder.fit(data.learn)
        fit_s = time.perf_counter() - t
        db, q, kept = encode_data(encoder, data)
        for a in alphas:
            ranks = rank_by_inner_product(
                l2_normalize(power_law(q, a)), l2_normalize(power_law(db, a))
            )
            m = score(setup.benchmark, ranks)
            rows.append({
                "mask": mask, "alpha": float(a), "D": encoder.dim, "mAP": _nan_to_none(m["map"]),
                "top-1": _nan_to_none(m["top1"]), "N-S": m["ns_score"], "kept %": kept,
                "fit s": round(fit_s, 1),
            })  # fmt: skip
    cols = ["mask", "alpha", *_metric_columns(setup)]
    return _result(
        "alpha", f"Power-law exponent alpha ({preset}; paper Figure 3)", setup, cols, rows, start
    )


def feature_correlations(fmap, mask: np.ndarray, bins: np.ndarray) -> tuple[np.ndarray, float, int]:
    """(histogram counts, sum, number) of the cosine similarities between every pair of distinct
    local features the mask keeps in one map (all-zero features, which have no direction, left out)."""
    X = fmap.local_features(mask).astype(np.float64)
    X = X[np.linalg.norm(X, axis=1) > 0]
    if len(X) < 2:
        return np.zeros(len(bins) - 1, np.int64), 0.0, 0
    X = l2_normalize(X)
    iu = np.triu_indices(len(X), k=1)
    cos = (X @ X.T)[iu]
    return np.histogram(np.clip(cos, -1, 1), bins=bins)[0], float(cos.sum()), len(cos)


def masks(
    setup: Setup, masks: Sequence[str] = MASKS, preset: str | None = "temb-demo-512"
) -> ExperimentResult:
    """Paper Figure 2 / section 3.3: per mask, the fraction of local features kept (mean and
    standard deviation over the database images), the distribution of the cosine similarity
    between the kept features of an image (selective masks should keep less redundant features),
    and the mAP of ``preset`` with that mask (None: no mAP, no learning set needed)."""
    start = time.perf_counter()
    data = setup.data()
    bins = np.linspace(-1.0, 1.0, CORRELATION_BINS + 1)
    rows, hists = [], {}
    for mask in masks:
        kept, counts, total, n = [], np.zeros(CORRELATION_BINS, np.int64), 0.0, 0
        for fmap in data.db:
            m = compute_mask(mask, fmap)
            kept.append(float(m.mean()))
            c, s, k = feature_correlations(fmap, m, bins)
            counts += c
            total += s
            n += k
        row = {"mask": mask, "kept %": float(np.mean(kept)), "kept sd": float(np.std(kept)),
               "mean corr": total / n if n else None}  # fmt: skip
        if preset is not None:
            report = setup.run_encoder(setup.config(preset, mask=mask), label=preset)
            row |= {k: v for k, v in _row(report).items() if k in ("D", "mAP", "top-1", "N-S")}
        rows.append(row)
        hists[mask] = (counts / max(counts.sum(), 1)).tolist()
    cols = ["mask", "kept %", "kept sd", "mean corr"] + (_metric_columns(setup) if preset else [])
    return _result(
        "masks", "Features kept and their correlation per mask (paper Figure 2, section 3.3)",
        setup, cols, rows, start, bins=bins.tolist(), histograms=hists,
    )  # fmt: skip


def baselines(
    setup: Setup,
    baselines: Sequence[str] = BASELINE_NAMES,
    whiten: Sequence[bool] = (False,),
    masks: Sequence[str] = ("max",),
    presets: Sequence[str] = ("temb-demo-512", "temb-demo-1024"),
) -> ExperimentResult:
    """Paper Table 6: the baselines (each with and/or without PCA-whitening learned on the
    learning set) against the method (each preset with each mask)."""
    start = time.perf_counter()
    rows = []
    for name in baselines:
        for w in whiten:
            report = setup.run_baseline(name, whiten=w)
            rows.append(_row(report, method=report.label, mask="-"))
    for name in presets:
        for mask in masks:
            config = setup.config(name, mask=mask)
            report = setup.run_encoder(config, label=name)
            rows.append(
                _row(
                    report,
                    method=f"{mask.upper()}-mask T-emb+demo"
                    if config.embedding == "temb"
                    else name,
                    mask=mask,
                )
            )
    cols = ["method", "mask", *_metric_columns(setup), "kept %", "learned comps"]
    return _result(
        "baselines",
        "Comparison with the baselines on the same conv maps (paper Table 6)",
        setup,
        cols,
        rows,
        start,
    )


EXPERIMENTS = {
    "frameworks": frameworks,
    "dims": dimensions,
    "image-size": image_sizes,
    "layers": layers,
    "alpha": alphas,
    "masks": masks,
    "baselines": baselines,
}

__all__ = [
    "ALPHAS",
    "BASELINE_NAMES",
    "DIM_PRESETS",
    "EXPERIMENTS",
    "ExperimentResult",
    "FRAMEWORKS",
    "LAYERS",
    "Setup",
    "alphas",
    "baselines",
    "dimensions",
    "feature_correlations",
    "fit_key",
    "frameworks",
    "image_sizes",
    "layers",
    "make_setup",
    "masks",
]
