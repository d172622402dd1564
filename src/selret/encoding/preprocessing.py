"""Pre-processing of local features (SPEC section 3): centre, PCA to d dims (not whitened), l2.

Also holds the small linear-algebra helpers the learned stages share: row l2-normalisation for
numpy arrays and torch tensors, streamed mean / covariance accumulation, and a descending
eigen-decomposition with a deterministic sign convention.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from selret.numerics import l2_normalize

Array = np.ndarray | torch.Tensor
State = dict[str, np.ndarray | int | float | str]

# Row blocks are sized by element count so that a float64 copy of one block stays ~32 MiB.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


class NotFittedError(RuntimeError):
    """An estimator was used before ``fit`` (or ``from_state`` / ``load``)."""


def check_is_fitted(estimator: Any, *attributes: str) -> None:
    """Raise NotFittedError naming the estimator unless every learned attribute exists.

    Learned attributes (trailing underscore) are created by ``fit`` only, so their presence is
    what "fitted" means; a learned value may legitimately be None (an encoder without rotation).
    """
    missing = [name for name in attributes if not hasattr(estimator, name)]
    if missing:
        raise NotFittedError(
            f"this {type(estimator).__name__} is not fitted yet (no {', '.join(missing)}); "
            "call fit() first"
        )


def check_matrix(X: Any, name: str = "X", n_cols: int | None = None) -> None:
    """Raise ``ValueError`` unless ``X`` is 2-D (with ``n_cols`` columns when given) and non-empty."""
    shape = tuple(X.shape) if hasattr(X, "shape") else np.shape(X)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) matrix, got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if n_cols is not None and shape[1] != n_cols:
        raise ValueError(f"{name} must have {n_cols} columns, got shape {shape}")


def iter_row_chunks(X: Any, max_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Iterator[Array]:
    """Consecutive row blocks of a 2-D array-like (ndarray, memmap, h5py dataset, tensor).

    Each block has at most ``max_elements`` entries (and at least one row). Tensors give
    tensor views on their device; anything else gives numpy arrays.
    """
    n, dim = X.shape
    step = max(1, max_elements // max(dim, 1))
    for start in range(0, n, step):
        block = X[start : start + step]
        yield block if isinstance(block, torch.Tensor) else np.asarray(block)


def mean_and_covariance(chunks: Iterable[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean (D,), population covariance (D, D) and row count of a stream of (m, D) row blocks.

    One pass, float64, on the device of the first block when the blocks are torch tensors (so
    a GPU accumulates the D x D products of GPU-computed embeddings). The blocks are shifted by
    the first block's mean before accumulating ``sum(x)`` and ``sum(x x^T)``; the shift keeps
    ``E[xx^T] - mm^T`` from cancelling catastrophically when the mean is large relative to
    the spread.
    """
    shift = s1 = s2 = None
    n = 0
    for block in chunks:
        check_matrix(block, "chunk")
        if not isinstance(block, torch.Tensor):
            block = np.asarray(block, dtype=np.float64)
            # torch warns on read-only buffers (np.load mmap); a block copy is cheap
            block = torch.from_numpy(block if block.flags.writeable else block.copy())
        if shift is None:
            block = block.to(torch.float64)
            shift = block.mean(dim=0)
            s1 = torch.zeros_like(shift)
            s2 = torch.zeros(
                (shift.numel(), shift.numel()), dtype=torch.float64, device=block.device
            )
        elif block.shape[1] != shift.numel():
            raise ValueError(f"chunk has {block.shape[1]} columns, expected {shift.numel()}")
        block = block.to(device=shift.device, dtype=torch.float64) - shift
        s1 += block.sum(dim=0)
        s2 += block.T @ block
        n += block.shape[0]
    if shift is None:
        raise ValueError("no rows to estimate a covariance from")
    shifted_mean = s1 / n
    cov = s2 / n - torch.outer(shifted_mean, shifted_mean)
    return (shift + shifted_mean).cpu().numpy(), ((cov + cov.T) / 2).cpu().numpy(), n


def eigh_descending(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix.

    Sign convention: each eigenvector's entry of largest magnitude is positive, so the result
    does not depend on the LAPACK build or on the order of the data.
    """
    values, vectors = np.linalg.eigh(cov)
    values, vectors = values[::-1], vectors[:, ::-1]
    pivots = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    vectors = vectors * np.where(pivots < 0, -1.0, 1.0)
    return np.ascontiguousarray(values), np.ascontiguousarray(vectors)


class LocalPCA:
    """Mean-centring, PCA projection to ``d`` dims (not whitened) and l2-normalisation.

    ``fit`` learns ``mean_`` (K,) and ``components_`` (K, d), the leading eigenvectors of the
    covariance of the training rows in order of decreasing variance (``explained_variance_``).
    The covariance is accumulated in row blocks of about ``max_block_elements`` entries, so
    millions of 512-dim rows need only K x K memory beyond the input. ``seed`` is accepted for
    a uniform estimator signature; the fit is deterministic.
    """

    def __init__(self, d: int, seed: int = 0, max_block_elements: int = DEFAULT_BLOCK_ELEMENTS):
        self.d = d
        self.seed = seed
        self.max_block_elements = max_block_elements

    def fit(self, X: Any) -> LocalPCA:
        """Learn mean and components from (n, K) local features (any row-sliceable 2-D array)."""
        check_matrix(X)
        K = X.shape[1]
        if not 1 <= self.d <= K:
            raise ValueError(f"d={self.d} must be between 1 and the feature dimension K={K}")
        mean, cov, _ = mean_and_covariance(iter_row_chunks(X, self.max_block_elements))
        values, vectors = eigh_descending(cov)
        self.mean_ = mean.astype(np.float32)
        self.components_ = np.ascontiguousarray(vectors[:, : self.d], dtype=np.float32)
        self.explained_variance_ = values[: self.d].copy()
        return self

    def transform(self, X: Array) -> Array:
        """(n, d) unit rows ``l2normalize((X - mean_) @ components_)``; numpy or torch in and out."""
        check_is_fitted(self, "mean_", "components_")
        check_matrix(X, n_cols=self.mean_.size)
        if isinstance(X, torch.Tensor):
            X = X.float() if not X.is_floating_point() else X
            mean = torch.as_tensor(self.mean_, dtype=X.dtype, device=X.device)
            components = torch.as_tensor(self.components_, dtype=X.dtype, device=X.device)
            return l2_normalize((X - mean) @ components)
        X = np.asarray(X, dtype=np.float32)
        return l2_normalize((X - self.mean_) @ self.components_)

    def fit_transform(self, X: Any) -> np.ndarray:
        return self.fit(X).transform(np.asarray(X))

    def get_state(self) -> State:
        check_is_fitted(self, "mean_", "components_")
        return {
            "d": int(self.d),
            "seed": int(self.seed),
            "mean": self.mean_,
            "components": self.components_,
            "explained_variance": self.explained_variance_,
        }

    @classmethod
    def from_state(cls, state: State) -> LocalPCA:
        pca = cls(int(state["d"]), seed=int(state["seed"]))
        pca.mean_ = np.asarray(state["mean"], dtype=np.float32)
        pca.components_ = np.asarray(state["components"], dtype=np.float32)
        pca.explained_variance_ = np.asarray(state["explained_variance"], dtype=np.float64)
        if pca.components_.shape != (pca.mean_.size, pca.d):
            raise ValueError(
                f"inconsistent LocalPCA state: components {pca.components_.shape}, "
                f"mean {pca.mean_.shape}, d={pca.d}"
            )
        return pca
