"""Retrieval methods as evaluation runs see them: the :class:`Method` protocol, the adapter that makes
an :class:`~selret.encoding.encoder.Encoder` one, and the one schema of a method's description.

The selective-feature encoder and the baselines (:class:`selret.evaluation.baselines.BaselineEncoder`)
both implement :class:`Method`; :func:`as_method` is the single place that tells them apart, so a
run (:mod:`selret.evaluation.runs`) calls the protocol only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.features import FeatureMap


class FitSummary(NamedTuple):
    """What a fit learned from, for the report: ``n_images`` learning images (0: nothing learned),
    extra learning-set ``fields`` and ``notes`` (sentences) worth telling the reader."""

    n_images: int
    fields: dict
    notes: list[str]


@runtime_checkable
class Method(Protocol):
    """Conv maps -> global vectors, with scikit-learn conventions.

    ``fit`` learns from held-out maps and returns the method; ``needs_fit`` says whether it must be
    fitted before ``encode`` (False for a method with nothing to learn, or already fitted).
    ``encode`` gives one (D,) float32 vector, ``encode_many`` the (N, D) stack. ``dim`` is D (None
    while it depends on maps not seen yet). ``describe`` gives the report fields of what the method
    is (:func:`describe_method`, whose ``method`` key is its name) and ``fit_summary`` what its
    fit learned from.
    """

    @property
    def dim(self) -> int | None: ...

    @property
    def needs_fit(self) -> bool: ...

    def fit(self, maps: Sequence[FeatureMap], progress: bool = False) -> Method: ...

    def encode(self, fmap: FeatureMap) -> np.ndarray: ...

    def encode_many(self, maps: Iterable[FeatureMap], progress: bool = False) -> np.ndarray: ...

    def describe(self) -> dict: ...

    def fit_summary(self) -> FitSummary: ...


def describe_method(
    label: str,
    *,
    weights: str,
    layer: str,
    max_side: int,
    embedding: str,
    whitening: str,
    mask: str = "-",
    aggregation: str = "-",
    **settings,
) -> dict:
    """The report's description of a method: its name (``method``), the maps it takes (``weights``,
    ``layer``, ``max_side``), its stages, then any method-specific ``settings``."""
    return {
        "method": label,
        "weights": weights,
        "layer": layer,
        "max_side": int(max_side),
        "mask": mask,
        "embedding": embedding,
        "aggregation": aggregation,
        "whitening": whitening,
        **settings,
    }


def extraction(method: Method) -> tuple[str, str, int]:
    """(weights, layer, max_side): the conv maps ``method`` takes."""
    d = method.describe()
    return d["weights"], d["layer"], int(d["max_side"])


def is_fitted(estimator) -> bool:
    """scikit-learn's rule: ``fit`` creates the learned (trailing underscore) attributes, so an
    estimator is fitted when it has one."""
    return any(k.endswith("_") and not k.startswith("_") for k in vars(estimator))


class EncoderMethod:
    """An :class:`~selret.encoding.encoder.Encoder` as a :class:`Method`; fitting it fits the
    wrapped encoder in place (so it can be saved afterwards)."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.config if self.encoder.config is not None else EncoderConfig()

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def needs_fit(self) -> bool:
        return not is_fitted(self.encoder)

    def fit(self, maps: Sequence[FeatureMap], progress: bool = False) -> EncoderMethod:
        self.encoder.fit(maps, progress=progress)
        return self

    def encode(self, fmap: FeatureMap) -> np.ndarray:
        return self.encoder.encode(fmap)

    def encode_many(self, maps: Iterable[FeatureMap], progress: bool = False) -> np.ndarray:
        return self.encoder.encode_many(maps, progress=progress)

    def encode_many_kept(
        self, maps: Iterable[FeatureMap], kept: list[float], progress: bool = False
    ) -> np.ndarray:
        """``encode_many`` (batched), appending each map's kept fraction of local features to
        ``kept``: the masks are computed once, by the encoder."""
        return self.encoder.encode_many(maps, progress=progress, kept=kept)

    def describe(self) -> dict:
        c = self.config
        return describe_method(
            c.preset or f"{c.embedding}+{c.aggregation}",
            weights=c.weights, layer=c.layer, max_side=c.max_side, mask=c.mask,
            embedding=c.embedding, aggregation=c.aggregation, whitening=c.rotation,
            d=c.d, k=c.k, alpha=c.alpha,
        )  # fmt: skip

    def fit_summary(self) -> FitSummary:
        enc, c = self.encoder, self.config
        if not is_fitted(enc):
            return FitSummary(0, {}, [])
        fields: dict = {}
        notes = []
        rot = enc.rotation_
        if rot is not None and rot.n_components_ < c.embedding_dim:
            fields["rotation_components"] = int(rot.n_components_)
            notes.append(
                f"rotation learned {rot.n_components_} of {c.embedding_dim} components "
                f"(N = {enc.n_train_images_} learning images); the rest completes the basis"
            )
        kept = float(enc.kept_fraction_)
        fields["kept_fraction"] = None if math.isnan(kept) else kept
        return FitSummary(int(enc.n_train_images_), fields, notes)

    def learning_manifest(self) -> dict | None:
        """The learning set recorded in the encoder file's header (``selret fit`` and the shipped
        pre-trained encoders record one: source, file names and sha256), else None."""
        provenance = getattr(self.encoder, "provenance_", None) or {}
        return provenance.get("learning_set")

    def __repr__(self) -> str:
        return f"EncoderMethod({self.encoder!r})"


def as_method(method: Encoder | Method) -> Method:
    """``method`` as a :class:`Method`: an Encoder is wrapped in :class:`EncoderMethod`."""
    if isinstance(method, Encoder):
        return EncoderMethod(method)
    if isinstance(method, Method):
        return method
    raise TypeError(f"{type(method).__name__} is neither an Encoder nor a Method")


__all__ = [
    "EncoderMethod",
    "FitSummary",
    "Method",
    "as_method",
    "describe_method",
    "extraction",
    "is_fitted",
]
