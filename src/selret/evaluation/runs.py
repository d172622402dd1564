"""Evaluation runs: one method on one retrieval benchmark, end to end, with a report.

    benchmark (selret.evaluation.datasets) + learning set --prepare--> EvalData (conv maps, cached)
    EvalData + method (selret.evaluation.methods.Method) --run--> EvalReport (mAP, per-query AP, times)

:func:`~selret.evaluation.data.prepare` extracts the maps (:mod:`selret.evaluation.data`);
:func:`run` fits the method on the learning set when it needs it, encodes database and queries,
ranks by inner product, scores (:mod:`selret.evaluation.scoring`) and reports
(:mod:`selret.evaluation.report`). One ``EvalData`` serves any number of methods, which is how
:mod:`selret.evaluation.experiments` runs a grid. Methods are used through the
:class:`~selret.evaluation.methods.Method` protocol only.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from selret.encoding.encoder import Encoder
from selret.evaluation.data import EvalData, prepare
from selret.evaluation.datasets import RetrievalBenchmark
from selret.evaluation.learning import LearningSetOverlapError
from selret.evaluation.methods import Method, as_method, extraction
from selret.evaluation.metrics import rank_by_inner_product
from selret.evaluation.report import TOP_KEPT, EvalReport, json_float
from selret.evaluation.scoring import score
from selret.features import FeatureMap
from selret.files import file_digest


class _ObservedMap(FeatureMap):
    """A FeatureMap that records the share of its grid the method read through
    ``local_features(mask)``: the run learns what the method's mask kept from the mask the method
    computed, instead of computing it a second time. A method that never asks for masked local
    features (a baseline pooling the whole map) kept everything. (A method with
    ``encode_many_kept``, the selective encoder, reports its masks itself.)"""

    kept = 1.0

    @classmethod
    def of(cls, fmap: FeatureMap) -> _ObservedMap:
        return cls(**{f.name: getattr(fmap, f.name) for f in dataclasses.fields(fmap)})

    def local_features(self, mask: np.ndarray | None = None) -> np.ndarray:
        self.kept = 1.0 if mask is None else float(np.mean(mask))
        return super().local_features(mask)


def _encode(method: Method, maps: Iterable[FeatureMap]) -> tuple[np.ndarray, list[float]]:
    batched = getattr(method, "encode_many_kept", None)
    if batched is not None:  # batched encoding; the encoder records what its masks kept
        kept: list[float] = []
        return np.asarray(batched(maps, kept), np.float32), kept
    vecs, kept = [], []
    for fmap in maps:
        seen = _ObservedMap.of(fmap)
        vecs.append(method.encode(seen))
        kept.append(seen.kept)
    return np.stack(vecs).astype(np.float32), kept


def encode_data(method: Encoder | Method, data: EvalData) -> tuple[np.ndarray, np.ndarray, float]:
    """(database vectors, query vectors, mean fraction of database features the mask kept)
    of a fitted ``method``."""
    method = as_method(method)
    db_vecs, kept = _encode(method, data.db)
    q_vecs, _ = _encode(method, data.queries)
    return db_vecs, q_vecs, float(np.mean(kept))


def check_manifest_disjoint(manifest: dict, data: EvalData) -> None:
    """Raise LearningSetOverlapError if an evaluated image has the content (sha256) of an image
    the method learned from, by the learning-set manifest of its file."""
    learned = {sha for _, sha in manifest.get("files", [])}
    bench = data.benchmark
    evaluated = [bench.image_path(i) for i in range(len(bench))]
    evaluated += [bench.query_path(q) for q in bench.queries]
    overlap = sorted({Path(p) for p in evaluated if file_digest(p) in learned})
    if overlap:
        raise LearningSetOverlapError(overlap, len(learned))


def _learning_set(
    method: Method, data: EvalData, fitted_here: bool, fitted_on_learn: bool
) -> tuple[dict, list[str]]:
    """The report's learning-set fields and notes for a fitted ``method``."""
    summary = method.fit_summary()
    notes: list[str] = []
    if fitted_here or (fitted_on_learn and data.learn is not None):
        learning = {"name": data.learn_name, "n_images": len(data.learn), "disjoint_checked": True}
        if not fitted_here:
            notes.append("the fit on this learning set was reused from an earlier run")
    elif manifest := getattr(method, "learning_manifest", lambda: None)():
        # Fitted elsewhere, but its file lists what it learned from: check the overlap by content.
        check_manifest_disjoint(manifest, data)
        learning = {
            "name": manifest.get("source"),
            "n_images": int(manifest.get("n_images", len(manifest.get("files", [])))),
            "disjoint_checked": True,
        }
    elif summary.n_images:
        learning = {
            "name": "fitted elsewhere (learning set not recorded)",
            "n_images": summary.n_images,
            "disjoint_checked": False,
        }
        notes.append(
            "the method was fitted elsewhere: its learning set could not be checked for overlap"
        )
    else:
        learning = {"name": None, "n_images": 0, "disjoint_checked": True}
    if data.learn_failed:
        notes.append(f"{len(data.learn_failed)} learning images could not be read and were skipped")
    return learning | summary.fields, notes + summary.notes


def run(
    data: EvalData,
    method: Encoder | Method,
    label: str | None = None,
    progress: bool = False,
    fitted_on_learn: bool = False,
) -> EvalReport:
    """Fit ``method`` on ``data.learn`` if it needs fitting, encode, rank and score.

    ``method`` is a :class:`~selret.evaluation.methods.Method` (e.g. a
    :class:`~selret.evaluation.baselines.BaselineEncoder`) or an
    :class:`~selret.encoding.encoder.Encoder` (fitted, e.g. loaded from a file, or not). Its
    extraction setting (weights, layer, image size) must be the one ``data`` was extracted with.
    ``fitted_on_learn`` says that a fitted ``method`` was fitted on ``data.learn`` (e.g. reloaded
    from an earlier run), so the report names that learning set, which ``prepare`` checked,
    instead of an unknown one. ``label`` renames the method in the report.
    """
    method = as_method(method)
    bench = data.benchmark
    if extraction(method) != (data.weights, data.layer, data.max_side):
        raise ValueError(
            f"the method takes {extraction(method)} maps (weights, layer, size) but the data holds "
            f"{(data.weights, data.layer, data.max_side)}"
        )
    times = {"extract": data.extract_seconds, "fit": 0.0}
    fit_here = method.needs_fit
    if fit_here:
        if data.learn is None or len(data.learn) == 0:
            raise ValueError(f"{method!r} must be fitted and no learning set was given")
        t = time.perf_counter()
        method.fit(data.learn, progress=progress)
        times["fit"] = time.perf_counter() - t
    learning, notes = _learning_set(method, data, fit_here, fitted_on_learn)

    t = time.perf_counter()
    db_vecs, q_vecs, kept = encode_data(method, data)
    times["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    ranks = rank_by_inner_product(q_vecs, db_vecs)
    metrics = score(bench, ranks)
    times["search"] = time.perf_counter() - t

    per_query = [
        {
            "name": q.name,
            "category": q.category,
            "ap": json_float(ap),
            "top1": json_float(hit),
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
        method=method.describe() | ({"method": label} if label else {}),
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
    method: Encoder | Method,
    learn: Sequence[str | Path] | None = None,
    learn_name: str | None = None,
    cache_dir: str | Path | None = None,
    backbone=None,
    device: str | None = None,
    label: str | None = None,
    progress: bool = False,
) -> EvalReport:
    """:func:`~selret.evaluation.data.prepare` the maps ``method`` needs, then :func:`run` it: one
    call, one report."""
    method = as_method(method)
    weights, layer, max_side = extraction(method)
    data = prepare(
        benchmark, weights=weights, layer=layer, max_side=max_side,
        learn=learn if method.needs_fit else None, learn_name=learn_name,
        cache_dir=cache_dir, backbone=backbone, device=device, progress=progress,
    )  # fmt: skip
    return run(data, method, label=label, progress=progress)


__all__ = ["encode_data", "evaluate", "run"]
