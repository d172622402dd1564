"""Global-descriptor baselines on the same conv maps: SPoC, MAC, GeM, R-MAC and CroW.

Each function takes one (K, H, W) conv map (numpy array, torch tensor or
:class:`selret.features.FeatureMap`) and returns a (K,) float32 l2-normalised vector.
:class:`PCAWhitening` is the optional learned post-processing (PCA-whitening, dimension
reduction, l2) that the original papers apply after pooling; fit it on a held-out set.
:class:`BaselineEncoder` is a baseline (+ optional whitening) as a
:class:`selret.evaluation.methods.Method`, for evaluation runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from selret.encoding.postprocessing import Rotation
from selret.encoding.preprocessing import check_is_fitted
from selret.evaluation.methods import FitSummary, describe_method
from selret.features import FeatureMap
from selret.numerics import l2_normalize

# Epsilon of cirtorch's per-region l2 (v / (||v|| + eps)) and GeM clamp.
EPS = 1e-6


def _as_map(F) -> np.ndarray:
    """(K, H, W) float32 numpy array from a numpy array, torch tensor or FeatureMap."""
    if isinstance(F, FeatureMap):
        F = F.features
    elif hasattr(F, "detach"):  # torch tensor, without importing torch here
        F = F.detach().cpu().numpy()
    F = np.asarray(F, dtype=np.float32)
    if F.ndim != 3 or min(F.shape) == 0:
        raise ValueError(f"expected a non-empty (K, H, W) conv map, got shape {F.shape}")
    return F


def _l2(v: np.ndarray) -> np.ndarray:
    return l2_normalize(np.asarray(v, dtype=np.float32)).astype(np.float32)


def spoc_weights(H: int, W: int) -> np.ndarray:
    """(H, W) Gaussian centre prior of SPoC (Babenko & Lempitsky 2015).

    ``exp(-d^2 / (2 sigma^2))`` with ``d`` the distance of a cell centre to the map centre and
    ``sigma`` one third of the distance from the centre to the closest border, ``min(H, W) / 6``
    in cell units.
    """
    sigma = min(H, W) / 6.0
    y = np.arange(H) - (H - 1) / 2.0
    x = np.arange(W) - (W - 1) / 2.0
    d2 = y[:, None] ** 2 + x[None, :] ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def spoc(F, centering: bool = True) -> np.ndarray:
    """SPoC: sum pooling, weighted by the Gaussian centre prior when ``centering``, then l2."""
    F = _as_map(F)
    if centering:
        F = F * spoc_weights(F.shape[1], F.shape[2])
    return _l2(F.sum(axis=(1, 2), dtype=np.float64))


def mac(F) -> np.ndarray:
    """MAC: per-channel maximum over the grid, then l2."""
    return _l2(_as_map(F).max(axis=(1, 2)))


def gem(F, p: float = 3.0, eps: float = EPS) -> np.ndarray:
    """GeM: ``(mean(max(F, eps)^p))^(1/p)`` per channel, then l2 (p=1: average, p->inf: MAC).

    Values are clamped at ``eps`` first, as in cirtorch, so the power is defined.
    """
    if not p > 0:
        raise ValueError(f"GeM exponent p must be > 0, got {p}")
    F = np.maximum(_as_map(F).astype(np.float64), eps)
    # Scaling by the maximum before the power keeps large p from overflowing; the scale cancels.
    scale = F.max(axis=(1, 2), keepdims=True)
    pooled = (((F / scale) ** p).mean(axis=(1, 2))) ** (1.0 / p) * scale[:, 0, 0]
    return _l2(pooled)


def rmac_regions(H: int, W: int, L: int = 3) -> list[tuple[int, int, int]]:
    """R-MAC square regions (top, left, side) of an H x W map, exactly as cirtorch's ``rmac``.

    Tolias et al.: at level l = 1..L the side is ``floor(2 min(H, W) / (l + 1))``; the regions are
    spread uniformly, ``l`` along the short side and ``l + extra`` along the long side, where
    ``extra`` (0 for a square map) makes neighbours overlap by close to 40%. The full-map region
    that cirtorch adds is not included here. Computed in float32 like cirtorch, so ties resolve
    the same way.
    """
    if L < 1:
        raise ValueError(f"R-MAC needs L >= 1 levels, got {L}")
    ovr = 0.4  # desired overlap of neighbouring regions
    steps = np.array([2, 3, 4, 5, 6, 7], dtype=np.float32)  # candidate region counts, long side
    w = min(W, H)
    b = np.float32(max(H, W) - w) / (steps - 1)
    idx = int(np.argmin(np.abs(((w**2 - w * b) / w**2) - ovr)))
    Wd = idx + 1 if H < W else 0
    Hd = idx + 1 if H > W else 0

    def starts(n_regions: int, size: int, wl: int, wl2: int) -> list[int]:
        step = 0.0 if n_regions == 1 else (size - wl) / (n_regions - 1)
        centres = np.floor(wl2 + np.arange(n_regions, dtype=np.float32) * np.float32(step)) - wl2
        return [int(c) for c in centres]

    regions = []
    for level in range(1, L + 1):
        wl = math.floor(2 * w / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        for top in starts(level + Hd, H, wl, wl2):
            for left in starts(level + Wd, W, wl, wl2):
                regions.append((top, left, wl))
    return regions


def rmac(F, L: int = 3, include_global: bool = True, eps: float = EPS) -> np.ndarray:
    """R-MAC (Tolias et al. 2016) as cirtorch: sum of l2-normalised region MACs, then l2.

    Regions from :func:`rmac_regions`; ``include_global`` adds the full-map MAC as cirtorch does
    (Tolias's original code does not). Each region vector is divided by ``||v|| + eps``.
    """
    F = _as_map(F)
    boxes = [(0, 0, F.shape[1], F.shape[2])] if include_global else []
    boxes += [(t, left, s, s) for t, left, s in rmac_regions(F.shape[1], F.shape[2], L)]
    total = np.zeros(F.shape[0], dtype=np.float64)
    for top, left, h, w in boxes:
        v = F[:, top : top + h, left : left + w].max(axis=(1, 2)).astype(np.float64)
        total += v / (np.linalg.norm(v) + eps)
    return _l2(total)


def crow_spatial_weights(F, a: float = 2.0, b: float = 2.0) -> np.ndarray:
    """(H, W) CroW spatial weights: ``(S / ||S||_a)^(1/b)`` with ``S`` the channel sum."""
    S = _as_map(F).sum(axis=0, dtype=np.float64)
    z = (S**a).sum() ** (1.0 / a)
    if z == 0:
        return np.zeros_like(S, dtype=np.float32)
    return ((S / z) ** (1.0 / b)).astype(np.float32)


def crow_channel_weights(F) -> np.ndarray:
    """(K,) CroW channel weights: ``log(sum_j q_j / q_k)`` with ``q_k`` the fraction of non-zero
    cells of channel k (0 for an all-zero channel), an idf-like boost of sparse channels."""
    F = _as_map(F)
    q = np.count_nonzero(F.reshape(F.shape[0], -1), axis=1) / float(F.shape[1] * F.shape[2])
    total = q.sum()
    weights = np.zeros_like(q)
    nz = q > 0
    weights[nz] = np.log(total / q[nz])
    return weights.astype(np.float32)


def crow(F, a: float = 2.0, b: float = 2.0) -> np.ndarray:
    """CroW (Kalantidis et al. 2016): spatially weighted sum pooling times channel weights, l2.

    CroW is defined on non-negative (post-ReLU) maps; negative values are clamped to 0.
    """
    F = np.maximum(_as_map(F), 0)
    pooled = (F * crow_spatial_weights(F, a, b)).sum(axis=(1, 2), dtype=np.float64)
    return _l2(pooled * crow_channel_weights(F))


BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "spoc": spoc,
    "mac": mac,
    "gem": gem,
    "rmac": rmac,
    "crow": crow,
}


def compute_baseline(name: str, F, **kwargs) -> np.ndarray:
    """The baseline ``name`` (a key of :data:`BASELINES`) of conv map ``F``."""
    try:
        fn = BASELINES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}") from None
    return fn(F, **kwargs)


class PCAWhitening:
    """PCA-whitening of global vectors, optional dimension reduction, then l2.

    ``fit(X)`` learns the mean and the PCA of held-out vectors X (N, D) with
    :class:`selret.encoding.postprocessing.Rotation` (``whiten=True``): each component is divided by the
    square root of its eigenvalue (+ ``eps``). ``transform`` keeps the first ``dim`` components
    (all D when None) and l2-normalises. With N <= D only N - 1 components carry learned variance;
    keep ``dim`` below N for a meaningful whitening.
    """

    def __init__(self, dim: int | None = None, eps: float = 1e-9):
        self.dim = dim
        self.eps = eps

    def fit(self, X: np.ndarray) -> PCAWhitening:
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1 or None, got {self.dim}")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 2 and self.dim is not None and self.dim > X.shape[1]:
            raise ValueError(f"dim={self.dim} exceeds the vector dimension {X.shape[1]}")
        self.rotation_ = Rotation(whiten=True, eps=float(self.eps)).fit(X)
        return self

    def transform(self, X: np.ndarray, normalize: bool = True) -> np.ndarray:
        """(N, dim) or (dim,) float32 whitened vectors; l2-normalised unless ``normalize=False``."""
        check_is_fitted(self, "rotation_")
        out = self.rotation_.transform(np.asarray(X, dtype=np.float64))[..., : self.dim]
        return (l2_normalize(out) if normalize else out).astype(np.float32)

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)

    def get_state(self) -> dict[str, np.ndarray | int | float | str]:
        check_is_fitted(self, "rotation_")
        state = {f"rotation.{k}": v for k, v in self.rotation_.get_state().items()}
        return {"dim": 0 if self.dim is None else int(self.dim), **state}

    @classmethod
    def from_state(cls, state: dict) -> PCAWhitening:
        dim = int(state["dim"])
        white = cls(dim=dim or None)
        prefix = "rotation."
        white.rotation_ = Rotation.from_state(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        white.eps = white.rotation_.eps
        return white


class BaselineEncoder:
    """A baseline global descriptor (SPoC, MAC, GeM, R-MAC, CroW) as a
    :class:`~selret.evaluation.methods.Method`.

    ``fit(maps)`` learns the optional :class:`PCAWhitening` (``whiten``) on a held-out set; without
    it there is nothing to learn. ``n_components`` is the whitened dimension (None: the channels
    K, capped at N - 1 learning images, the components whitening can learn). ``params`` go to the
    baseline function (e.g. ``centering=False`` for plain sum pooling). ``weights`` / ``layer`` /
    ``max_side`` say which conv maps it takes; ``label`` names it in reports.
    """

    def __init__(
        self,
        name: str,
        whiten: bool = False,
        n_components: int | None = None,
        weights: str = "vgg16-caffe",
        layer: str = "pool5",
        max_side: int = 1024,
        label: str | None = None,
        **params,
    ):
        self.name = name
        self.whiten = whiten
        self.n_components = n_components
        self.weights = weights
        self.layer = layer
        self.max_side = max_side
        self.label = label
        self.params = params

    @property
    def kind(self) -> str:
        """The baseline's key in :data:`BASELINES`."""
        key = self.name.lower()
        if key not in BASELINES:
            raise ValueError(f"unknown baseline {self.name!r}; known: {', '.join(BASELINES)}")
        return key

    @property
    def needs_fit(self) -> bool:
        return bool(self.whiten) and not hasattr(self, "whitening_")

    @property
    def dim(self) -> int | None:
        """Output dimension: the whitened one once fitted, else None (the maps' channel count)."""
        return getattr(self, "n_components_", None)

    def pool(self, fmap: FeatureMap) -> np.ndarray:
        """The (K,) l2-normalised baseline vector of one map, before any whitening."""
        return compute_baseline(self.kind, fmap, **self.params)

    def fit(self, maps, progress: bool = False) -> BaselineEncoder:
        if not self.whiten:
            return self
        X = np.stack([self.pool(f) for f in maps])
        if len(X) < 2:
            raise ValueError("PCA-whitening needs at least 2 learning images")
        n = self.n_components if self.n_components is not None else min(X.shape[1], len(X) - 1)
        self.whitening_ = PCAWhitening(dim=n).fit(X)
        self.n_components_ = n
        self.n_train_images_ = len(X)
        return self

    def encode(self, fmap: FeatureMap) -> np.ndarray:
        v = self.pool(fmap)
        if not self.whiten:
            return v
        check_is_fitted(self, "whitening_")
        return self.whitening_.transform(v)

    def encode_many(self, maps, progress: bool = False) -> np.ndarray:
        vecs = [self.encode(f) for f in maps]
        return np.stack(vecs) if vecs else np.zeros((0, self.dim or 0), np.float32)

    def describe(self) -> dict:
        label = self.label or self.kind + ("+PCAw" if self.whiten else "")
        whitening = "PCA-whitening" if self.whiten else "none"
        return describe_method(
            label, weights=self.weights, layer=self.layer, max_side=self.max_side,
            embedding=self.kind, whitening=whitening,
        )  # fmt: skip

    def fit_summary(self) -> FitSummary:
        return FitSummary(getattr(self, "n_train_images_", 0), {}, [])

    def __repr__(self) -> str:
        return f"BaselineEncoder({self.describe()['method']!r}, D={self.dim})"
