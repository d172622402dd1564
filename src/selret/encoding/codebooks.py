"""Codebooks of the embeddings (SPEC section 4): k-means centroids, F-FAemb anchors, diagonal GMM.

Codebooks are rows: centroids / anchors are (k, d) float32 (the SPEC's d x k matrix B is the
transpose of the anchors here); the Fisher vector's codebook is a ``DiagonalGMM``. Learning runs
on the CPU (faiss k-means, scikit-learn EM); one seed gives identical codebooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import faiss
import numpy as np
from sklearn.mixture import GaussianMixture

from selret.encoding.preprocessing import State, check_matrix
from selret.numerics import blas_brute_force

__all__ = [
    "Codebook",
    "DiagonalGMM",
    "best_kmeans",
    "check_codebook",
    "check_gmm",
    "codebook_from_state",
    "codebook_state",
    "fit_gmm",
    "kmeans",
]


def _check_k(X: np.ndarray, k: int) -> None:
    check_matrix(X)
    if not 1 <= k <= X.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of training rows n={X.shape[0]}")


def check_codebook(X: Any, C: Any, name: str = "C") -> None:
    """Raise ``ValueError`` unless the local features X (n, d) and the codebook rows C (k, d)
    are non-empty matrices of one dimension d (numpy arrays or torch tensors)."""
    check_matrix(X, "X")
    check_matrix(C, name)
    if C.shape[1] != X.shape[1]:
        raise ValueError(
            f"{name} has dimension {C.shape[1]} but the local features have {X.shape[1]}"
        )


def check_gmm(weights: Any, means: Any, variances: Any) -> None:
    """Raise ``ValueError`` unless ``weights`` (k,), ``means`` (k, d) and ``variances`` (k, d)
    are one diagonal GMM with positive weights and variances (numpy arrays or torch tensors)."""
    k, d = means.shape
    if tuple(weights.shape) != (k,) or tuple(variances.shape) != (k, d):
        raise ValueError(
            f"GMM parameters disagree: weights {tuple(weights.shape)}, means {(k, d)}, "
            f"variances {tuple(variances.shape)}"
        )
    if bool((weights <= 0).any()) or bool((variances <= 0).any()):
        raise ValueError("GMM weights and variances must be positive")


def kmeans(
    X: np.ndarray,
    k: int,
    n_iter: int = 100,
    n_restarts: int = 2,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
) -> np.ndarray:
    """k-means centroids (k, d) float32 of the rows of X (faiss, Lloyd iterations).

    Runs ``n_restarts`` times from seeded random initialisations and keeps the run with the
    lowest quantisation error (faiss ``nredo``); one seed gives identical centroids. All rows
    are used unless ``max_points_per_centroid`` is set, in which case faiss trains on a seeded
    random subsample of ``k * max_points_per_centroid`` rows.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    _check_k(X, k)
    n, d = X.shape
    if n_iter < 1 or n_restarts < 1:
        raise ValueError(f"n_iter={n_iter} and n_restarts={n_restarts} must be >= 1")
    km = faiss.Kmeans(
        d,
        k,
        niter=n_iter,
        nredo=n_restarts,
        seed=seed,
        verbose=False,
        # faiss subsamples to 256 points per centroid by default; the reference uses every row
        max_points_per_centroid=max_points_per_centroid or n // k + 1,
        # and warns below 39 points per centroid, which small codebook tests trip
        min_points_per_centroid=1,
    )
    # BLAS distances whatever else the process imported: the centroids must not depend on it.
    with blas_brute_force():
        km.train(X)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def best_kmeans(
    X: np.ndarray,
    k: int,
    objective: Callable[[np.ndarray], float],
    n_iter: int = 100,
    n_candidates: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Of ``n_candidates`` single k-means runs (seeds ``seed``, ``seed + 1``, ...), the centroids
    with the lowest ``objective(centroids)``; ties go to the first run.

    The reference (``init_B_by_kmeans``) picks the F-FAemb anchors this way, by the F-FAemb
    objective rather than by the quantisation error.
    """
    if n_candidates < 1:
        raise ValueError(f"n_candidates={n_candidates} must be >= 1")
    candidates = [kmeans(X, k, n_iter, n_restarts=1, seed=seed + t) for t in range(n_candidates)]
    scores = [float(objective(C)) for C in candidates]
    return candidates[int(np.argmin(scores))]


class DiagonalGMM(NamedTuple):
    """Diagonal Gaussian mixture: ``weights`` (k,), ``means`` (k, d), ``variances`` (k, d)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray


def fit_gmm(
    X: np.ndarray, k: int, seed: int = 0, n_iter: int = 100, reg_covar: float = 1e-6
) -> DiagonalGMM:
    """Diagonal-covariance GMM of the rows of X by EM (scikit-learn, k-means initialisation).

    ``reg_covar`` is added to every variance, keeping them positive for the Fisher vector.
    """
    X = np.asarray(X, dtype=np.float32)
    _check_k(X, k)
    gmm = GaussianMixture(
        n_components=k,
        covariance_type="diag",
        max_iter=n_iter,
        reg_covar=reg_covar,
        random_state=seed,
    ).fit(X)
    return DiagonalGMM(
        gmm.weights_.astype(np.float32),
        gmm.means_.astype(np.float32),
        gmm.covariances_.astype(np.float32),
    )


Codebook = np.ndarray | DiagonalGMM


def codebook_state(codebook: Codebook) -> State:
    """State entries of a codebook: ``codebook`` for centroids, ``gmm.<field>`` for a GMM."""
    if isinstance(codebook, DiagonalGMM):
        return {f"gmm.{name}": value for name, value in codebook._asdict().items()}
    return {"codebook": codebook}


def codebook_from_state(state: State, gmm: bool, shape: tuple[int, int]) -> Codebook:
    """The codebook ``codebook_state`` stored (a ``DiagonalGMM`` if ``gmm``), float32.

    Raises ``ValueError`` unless its centroids / means are ``shape`` (k, d).
    """
    if gmm:
        codebook: Codebook = DiagonalGMM(
            *(np.asarray(state[f"gmm.{name}"], np.float32) for name in DiagonalGMM._fields)
        )
        check_gmm(*codebook)
        found = codebook.means.shape
    else:
        codebook = np.asarray(state["codebook"], dtype=np.float32)
        found = codebook.shape
    if found != tuple(shape):
        raise ValueError(f"inconsistent codebook state: {found}, expected (k, d) = {shape}")
    return codebook
