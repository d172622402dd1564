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

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.encoding.masks import MASKS, compute_mask
from selret.encoding.postprocessing import power_law
from selret.encoding.presets import COMPARISON_4224
from selret.evaluation.baselines import BaselineEncoder
from selret.evaluation.data import EvalData, prepare
from selret.evaluation.datasets import NS_SCORE, RetrievalBenchmark
from selret.evaluation.experiment_results import ExperimentResult
from selret.evaluation.learning import image_paths, source_name
from selret.evaluation.metrics import rank_by_inner_product
from selret.evaluation.report import EvalReport, json_float
from selret.evaluation.runs import encode_data, run
from selret.evaluation.scoring import score
from selret.files import file_digest
from selret.numerics import l2_normalize

# Paper Table 3: framework -> EncoderConfig fields, at the 4224-D (d, k) of Table 2.
_FRAMEWORK_STAGES = (
    ("FV+avg", "fv", "average"),
    ("FV+demo", "fv", "democratic"),
    ("VLAD+sum", "vlad", "sum"),
    ("VLAD+demo", "vlad", "democratic"),
    ("T-emb+demo", "temb", "democratic"),
    ("F-FAemb+demo", "faemb", "democratic"),
)
FRAMEWORKS: dict[str, dict] = {
    label: {"embedding": emb, "aggregation": agg, "d": COMPARISON_4224[emb][0],
            "k": COMPARISON_4224[emb][1]}
    for label, emb, agg in _FRAMEWORK_STAGES
}  # fmt: skip

DIM_PRESETS = ("temb-demo-512", "temb-demo-1024", "temb-demo-2048", "temb-demo-4096")
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LAYERS = ("conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "pool5")
BASELINE_NAMES = ("spoc", "mac", "gem", "rmac", "crow")
# Histogram of local-feature correlations (cosine similarities lie in [-1, 1]).
CORRELATION_BINS = 100


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


def _row(report: EvalReport, **keys) -> dict:
    """A result row: ``keys`` then the report's figures."""
    learn = report.learning_set
    return {
        **keys,
        "D": report.dim,
        "mAP": json_float(report.map),
        "top-1": json_float(report.top1),
        "N-S": report.ns_score,
        "kept %": report.kept_fraction,
        "learned comps": learn.get("rotation_components"),
        "fit s": round(report.times["fit"], 1),
        "per_group": report.per_group,
        "per_query_ap": [q["ap"] for q in report.per_query],
    }


def _metric_columns(setup: Setup) -> list[str]:
    ns = NS_SCORE in setup.benchmark.metrics
    return ["D", "mAP", "top-1"] + (["N-S"] if ns else [])


def _result(
    name: str, title: str, setup: Setup, columns, rows, start: float, **extra
) -> ExperimentResult:
    return ExperimentResult(
        name, title, list(columns), rows, setup.describe(), extra, time.perf_counter() - start
    )


# --------------------------------------------------------------------------- the grid


def grid(
    setup: Setup,
    varied: str,
    values: Mapping[object, Mapping],
    masks: Sequence[str],
    preset: str | None = None,
    mask_major: bool = False,
) -> list[dict]:
    """One encoder run per (value of the ``varied`` parameter, mask), one result row each.

    ``values`` maps each value, as its row shows it in the ``varied`` column, to the EncoderConfig
    fields it sets; a ``preset`` entry picks the preset (default ``preset``). Each run is labelled
    with its preset, or with the value when there is none. Rows go value by value, each with every
    mask, or mask by mask with ``mask_major``.
    """
    pairs = [(v, m) for m in masks for v in values] if mask_major else [
        (v, m) for v in values for m in masks
    ]  # fmt: skip
    rows = []
    for value, mask in pairs:
        fields = dict(values[value])
        name = fields.pop("preset", preset)
        report = setup.run_encoder(
            setup.config(name, mask=mask, **fields), label=name or str(value)
        )
        rows.append(_row(report, **{varied: value, "mask": mask}))
    return rows


def _each(field_name: str, values: Sequence) -> dict:
    """``{value: {field_name: value}}``: a grid over one config field (or ``preset``)."""
    return {v: {field_name: v} for v in values}


# --------------------------------------------------------------------------- experiments


def frameworks(
    setup: Setup, masks: Sequence[str] = MASKS, frameworks: dict[str, dict] | None = None
) -> ExperimentResult:
    """Paper Table 3: each embedding + aggregation framework with each mask.

    ``frameworks`` maps a label to EncoderConfig fields (default :data:`FRAMEWORKS`, the 4224-D
    settings; pass smaller d, k for a quick run).
    """
    start = time.perf_counter()
    rows = grid(setup, "framework", frameworks or FRAMEWORKS, masks)
    cols = ["framework", "mask", *_metric_columns(setup), "fit s"]
    title = "Embedding and aggregation frameworks x masks (paper Table 3)"
    return _result("frameworks", title, setup, cols, rows, start)


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
    rows = grid(setup, "preset", _each("preset", presets), masks, mask_major=True)
    cols = ["mask", "preset", *_metric_columns(setup), "learned comps", "fit s"]
    title = "mAP against the final dimension D (paper Figure 4)"
    return _result("dims", title, setup, cols, rows, start)


def image_sizes(
    setup: Setup,
    sizes: Sequence[int] = (724, 1024),
    masks: Sequence[str] = ("max",),
    preset: str = "temb-demo-512",
) -> ExperimentResult:
    """Paper Table 5: the longest image side (each size is extracted on its own)."""
    start = time.perf_counter()
    rows = grid(setup, "size", _each("max_side", [int(s) for s in sizes]), masks, preset)
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
    rows = grid(setup, "layer", _each("layer", layers), masks, preset)
    cols = ["layer", "mask", *_metric_columns(setup), "kept %"]
    title = f"Layer of the local features ({preset}; paper Figure 5)"
    return _result("layers", title, setup, cols, rows, start)


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
                "mask": mask, "alpha": float(a), "D": encoder.dim, "mAP": json_float(m["map"]),
                "top-1": json_float(m["top1"]), "N-S": m["ns_score"], "kept %": kept,
                "fit s": round(fit_s, 1),
            })  # fmt: skip
    cols = ["mask", "alpha", *_metric_columns(setup)]
    title = f"Power-law exponent alpha ({preset}; paper Figure 3)"
    return _result("alpha", title, setup, cols, rows, start)


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


def _method_name(preset: str, mask: str) -> str:
    """How Table 6 names the method: ``MAX-mask T-emb+demo`` for T-emb presets, else the preset."""
    temb = EncoderConfig.from_preset(preset).embedding == "temb"
    return f"{mask.upper()}-mask T-emb+demo" if temb else preset


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
    for row in grid(setup, "preset", _each("preset", presets), masks):
        method = _method_name(row.pop("preset"), row["mask"])
        rows.append({"method": method, **row})
    cols = ["method", "mask", *_metric_columns(setup), "kept %", "learned comps"]
    title = "Comparison with the baselines on the same conv maps (paper Table 6)"
    return _result("baselines", title, setup, cols, rows, start)


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
    "grid",
    "image_sizes",
    "layers",
    "make_setup",
    "masks",
]
