"""Post-processing of aggregated vectors (SPEC section 6): l2, rotation, drop, power law, l2.

Vectors are rows: (D,) for one image or (N, D) for many. The rotation is learned on the
l2-normalised aggregated vectors of a held-out set (``Rotation.fit``); ``postprocess`` chains the
steps for the vectors to encode.

Small learning sets. N learning images determine r <= N - 1 rotation directions; the rest of the
basis is an arbitrary completion (SPEC 6). Two rules keep such encoders well defined (both are
no-ops once r >= 2 * drop, e.g. every shipped encoder):

- ``drop_start``: the drop removes leading *learned* directions only while as many learned ones
  stay; with r <= drop the paper's rule would keep completion directions only, and a learning
  image, which lies in the learned span, would be encoded as pure rounding noise.
- ``COMPLETION_NOISE``: a vector whose component on the (kept) completion directions is at
  rounding level (a learning image) gets exactly zero there. The power law's slope is infinite at
  0, so otherwise float32 rounding, which differs between a batched and a single-image encode or
  between CPU and GPU, would be amplified into components of about 1e-3.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from selret.encoding.preprocessing import check_is_fitted
from selret.numerics import l2_normalize


def power_law(x: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Signed power normalisation sign(x) |x|^alpha; ``alpha = 1`` leaves ``x`` unchanged."""
    if not alpha > 0:
        raise ValueError(f"power-law exponent alpha must be > 0, got {alpha}")
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if alpha == 1:
        return x.copy()
    return np.sign(x) * np.abs(x) ** np.asarray(alpha, dtype=x.dtype)


# Norm below which the completion part of a rotated unit vector counts as rounding noise. A learning
# image has about 1e-6 there (float32 rounding through whitening and aggregation); an image outside
# the learning set has its distance to the learned span, about 0.1 or more.
COMPLETION_NOISE = 1e-3


def drop_start(n_learned: int, drop: int) -> int:
    """Index of the first kept rotated component: ``drop`` (the paper's rule) when the rotation
    learned at least ``2 * drop`` directions, else only the learned directions beyond ``drop``,
    ``max(0, n_learned - drop)``, so that at least ``min(n_learned, drop)`` learned ones stay."""
    if drop < 0 or n_learned < 0:
        raise ValueError(f"drop and n_learned must be >= 0, got {drop}, {n_learned}")
    return min(drop, max(0, n_learned - drop))


def drop_leading(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` (..., D) without its first ``n`` components (..., D - n)."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("drop_leading needs vectors, got a scalar")
    if not 0 <= n < x.shape[-1]:
        raise ValueError(f"can drop 0..{x.shape[-1] - 1} of {x.shape[-1]} components, got {n}")
    return x[..., n:]


class Rotation:
    """PCA rotation of R^D learned from N training vectors, completed to a full orthonormal basis.

    ``fit(X)`` centres X (N, D) and finds its r <= min(N - 1, D) principal directions by SVD (the
    numerical rank r counts the singular values above the usual relative tolerance). The leading
    r columns of ``P_`` (D, D) are these eigenvectors, by decreasing eigenvalue; the other D - r
    columns are an orthonormal basis of their orthogonal complement (the remaining right singular
    vectors of the full SVD), so that with few training vectors the transform is still a rotation of the
    whole space and keeps all D dimensions. ``transform(X) = (X - mean_) @ P_``.

    With ``whiten=True`` each output component is divided by sqrt(eigenvalue + eps). The completed
    components have no learned variance (``explained_variance_`` is 0 there); they are divided by
    sqrt(smallest learned eigenvalue + eps) so that they keep the scale of the weakest learned
    component instead of being amplified by 1/sqrt(eps). (If the training vectors are all equal
    there is no learned component; the basis is then the identity and nothing is scaled.)

    Attributes after fit: ``mean_`` (D,), ``P_`` (D, D), ``explained_variance_`` (D,) (the PCA
    eigenvalues, variance with N - 1 degrees of freedom), ``n_components_`` (r), ``scale_`` (D,)
    (the factor each output component is multiplied by; ones without whitening).
    """

    def __init__(self, whiten: bool = False, eps: float = 1e-9):
        self.whiten = whiten
        self.eps = eps

    def fit(self, x: np.ndarray) -> Rotation:
        """Learn the mean and the rotation from training vectors ``x`` (N, D), N >= 2."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"Rotation.fit needs (N, D) vectors, got shape {x.shape}")
        n, d = x.shape
        if n < 2 or d < 1:
            raise ValueError(
                f"Rotation.fit needs at least 2 vectors of dimension >= 1, got {x.shape}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError("Rotation.fit got NaN or infinite values")

        self.mean_ = x.mean(axis=0)
        centred = x - self.mean_
        # SVD of the N x D matrix, cheap for the usual N << D. Its right singular vectors are the
        # covariance eigenvectors, sorted by decreasing singular value; asking for all D of them
        # (full_matrices when N < D) also gives an orthonormal basis of the orthogonal complement
        # of the data span, i.e. the completion, in the same call.
        _, singular, vt = scipy.linalg.svd(centred, full_matrices=n < d, check_finite=False)
        tol = singular.max(initial=0.0) * max(n, d) * np.finfo(singular.dtype).eps
        rank = int((singular > tol).sum())
        # Nothing learned (all training vectors equal): no rotation rather than LAPACK's basis.
        basis = np.ascontiguousarray(vt.T) if rank else np.eye(d, dtype=vt.dtype)
        # Deterministic signs (as scikit-learn's svd_flip): the largest |entry| of each learned
        # eigenvector is positive. The completion is any basis of the complement; leave it be.
        leading = basis[:, :rank]
        pivots = np.abs(leading).argmax(axis=0)
        leading *= np.sign(leading[pivots, np.arange(rank)])
        self.P_ = basis
        self.n_components_ = rank

        variance = np.zeros(d, dtype=x.dtype)
        variance[:rank] = singular[:rank] ** 2 / (n - 1)
        self.explained_variance_ = variance
        scale = np.ones(d, dtype=x.dtype)
        if self.whiten and rank:
            scale[:rank] = 1.0 / np.sqrt(variance[:rank] + self.eps)
            scale[rank:] = 1.0 / np.sqrt(variance[rank - 1] + self.eps)
        self.scale_ = scale
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Rotated (and, with ``whiten``, scaled) vectors: ``x`` (..., D) -> (..., D)."""
        check_is_fitted(self, "P_")
        x = np.asarray(x)
        if x.shape[-1:] != self.mean_.shape:
            raise ValueError(
                f"expected vectors of dimension {self.mean_.shape[0]}, got shape {x.shape}"
            )
        out = (x - self.mean_) @ self.P_
        return out * self.scale_ if self.whiten else out

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)

    def get_state(self) -> dict[str, np.ndarray | int | float | str]:
        """Parameters and learned state as arrays and scalars (for one npz + JSON file)."""
        check_is_fitted(self, "P_")
        return {
            "whiten": int(bool(self.whiten)),
            "eps": float(self.eps),
            "mean": self.mean_,
            "P": self.P_,
            "explained_variance": self.explained_variance_,
            "scale": self.scale_,
            "n_components": self.n_components_,
        }

    @classmethod
    def from_state(cls, state: dict) -> Rotation:
        """The fitted Rotation whose ``get_state()`` gave ``state``."""
        missing = {"whiten", "eps", "mean", "P", "explained_variance", "scale", "n_components"}
        missing -= set(state)
        if missing:
            raise ValueError(f"Rotation state lacks {sorted(missing)}")
        rot = cls(whiten=bool(int(state["whiten"])), eps=float(state["eps"]))
        rot.mean_ = np.asarray(state["mean"])
        rot.P_ = np.asarray(state["P"])
        rot.explained_variance_ = np.asarray(state["explained_variance"])
        rot.scale_ = np.asarray(state["scale"])
        rot.n_components_ = int(state["n_components"])
        d = rot.mean_.shape[0] if rot.mean_.ndim == 1 else -1
        if d < 1 or rot.P_.shape != (d, d) or rot.scale_.shape != (d,):
            raise ValueError(
                f"inconsistent Rotation state: mean {rot.mean_.shape}, P {rot.P_.shape}, "
                f"scale {rot.scale_.shape}"
            )
        return rot


def postprocess(
    psi: np.ndarray, rotation: Rotation | None = None, drop: int = 0, alpha: float = 0.5
) -> np.ndarray:
    """Final vectors from aggregated ones (SPEC 6): l2 -> rotation -> drop the first ``drop``
    components -> power law ``alpha`` (1 = none) -> l2.

    ``psi`` is (D,) or (N, D); ``rotation`` (fitted on l2-normalised aggregated vectors of a
    held-out set) may be None to skip that step. Returns float vectors of dimension D - drop.
    With a rotation that learned fewer than ``2 * drop`` directions, the kept components start at
    ``drop_start`` and completion components at rounding level are zeroed (see the module
    docstring). This is the reference of the step; ``selret.encoding.batched`` folds it.
    """
    x = l2_normalize(psi)
    if rotation is None:
        return l2_normalize(power_law(drop_leading(x, drop) if drop else x, alpha))
    x = rotation.transform(x)
    dim = drop_leading(x, drop).shape[-1]  # validates drop
    start = drop_start(rotation.n_components_, drop)
    x = x[..., start : start + dim]
    learned = max(rotation.n_components_ - start, 0)  # the kept learned components come first
    if learned < dim:
        completion = x[..., learned:]
        # every completion direction has the same scale (1 without whitening)
        scale = rotation.scale_[rotation.n_components_]
        noise = np.linalg.norm(completion, axis=-1, keepdims=True) <= COMPLETION_NOISE * scale
        x[..., learned:] = np.where(noise, 0, completion)
    return l2_normalize(power_law(x, alpha))
