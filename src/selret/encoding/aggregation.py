"""Aggregation of one image's embedded local features into one vector (SPEC section 5).

``phi`` is the (n, D) matrix whose rows are the n embedded local features of an image. Every
function takes a numpy array or a torch tensor and returns the same kind. The democratic weights
have a single implementation, in torch (batched, any device); numpy input goes through it on the
CPU without copying.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

AGGREGATIONS: tuple[str, ...] = ("sum", "average", "democratic")
_ALIASES = {"avg": "average", "mean": "average", "demo": "democratic"}

Array = np.ndarray | torch.Tensor


def _check_phi(phi: Array) -> Array:
    if not isinstance(phi, torch.Tensor):
        phi = np.asarray(phi)
    if phi.ndim != 2:
        raise ValueError(
            f"phi must be (n, D) embedded local features, got shape {tuple(phi.shape)}"
        )
    if phi.shape[0] == 0:
        raise ValueError("phi has no local feature (n = 0): nothing to aggregate")
    return phi


def sum_pool(phi: Array) -> Array:
    """Sum of the n rows of ``phi`` (n, D): a (D,) vector."""
    return _check_phi(phi).sum(0)


def average_pool(phi: Array) -> Array:
    """Mean of the n rows of ``phi`` (n, D): a (D,) vector."""
    return _check_phi(phi).mean(0)


def democratic_weights_torch(
    phi: torch.Tensor, gamma: float = 0.5, n_iter: int = 10
) -> torch.Tensor:
    """Democratic weights (Jegou & Zisserman 2014) of a batch of feature sets.

    ``phi`` is (..., n, D) float; the result is (..., n): weights lambda such that
    ``lambda_i * phi_i^T psi`` is about the same for every i, with psi = sum_i lambda_i phi_i.
    Sinkhorn-like iteration on the Gram matrix G = Phi Phi^T with negatives clipped to 0: start
    from lambda = 1 and repeat ``n_iter`` times: s = row sums of G, delta = s^-gamma,
    G <- diag(delta) G diag(delta), lambda <- lambda * delta.
    A zero row of ``phi`` (the only way to get a zero sum in G, since G_ii = |phi_i|^2 and G >= 0)
    gets weight 0 rather than an infinite one. Zero rows thus neither contribute nor change the
    other weights, which makes zero-padding a ragged batch exact.
    """
    if phi.ndim < 2:
        raise ValueError(f"phi must be (..., n, D), got shape {tuple(phi.shape)}")
    if phi.shape[-2] == 0:
        raise ValueError("phi has no local feature (n = 0): nothing to aggregate")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    if not phi.is_floating_point():
        phi = phi.float()
    gram = (phi @ phi.transpose(-1, -2)).clamp_(min=0)
    weights = torch.ones(phi.shape[:-1], dtype=phi.dtype, device=phi.device)
    for _ in range(n_iter):
        sums = gram.sum(-1)  # G stays symmetric, so row sums are its column sums
        positive = sums > 0
        delta = torch.where(positive, torch.where(positive, sums, 1.0).pow(-gamma), 0.0)
        gram = gram * delta.unsqueeze(-1) * delta.unsqueeze(-2)
        weights = weights * delta
    return weights


def _float_phi(phi: Array) -> Array:
    """``phi`` checked and cast to floating point (kept as is when already floating)."""
    phi = _check_phi(phi)
    if isinstance(phi, torch.Tensor):
        return phi if phi.is_floating_point() else phi.float()
    return phi if np.issubdtype(phi.dtype, np.floating) else phi.astype(np.float32)


def democratic_weights(phi: Array, gamma: float = 0.5, n_iter: int = 10) -> Array:
    """(n,) democratic weights of the rows of ``phi`` (n, D); see ``democratic_weights_torch``."""
    phi = _float_phi(phi)
    if isinstance(phi, torch.Tensor):
        return democratic_weights_torch(phi, gamma, n_iter)
    return democratic_weights_torch(
        torch.from_numpy(np.ascontiguousarray(phi)), gamma, n_iter
    ).numpy()


def democratic_pool(phi: Array, gamma: float = 0.5, n_iter: int = 10) -> Array:
    """Democratic aggregation of ``phi`` (n, D): sum_i lambda_i phi_i, a (D,) vector."""
    phi = _float_phi(phi)
    return democratic_weights(phi, gamma, n_iter) @ phi


def democratic_pool_torch(
    phis: Sequence[torch.Tensor | np.ndarray] | torch.Tensor,
    gamma: float = 0.5,
    n_iter: int = 10,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Democratic aggregation of a batch of images on one device: a (B, D) tensor.

    ``phis`` is a list of (n_b, D) feature sets (ragged n_b allowed: they are zero-padded, which
    changes nothing, see ``democratic_weights_torch``) or a (B, n, D) tensor. ``device`` defaults
    to that of the first set.
    """
    if isinstance(phis, torch.Tensor):
        if phis.ndim != 3:
            raise ValueError(f"a batch tensor must be (B, n, D), got shape {tuple(phis.shape)}")
        batch = phis.to(device) if device is not None else phis
    else:
        if len(phis) == 0:
            raise ValueError("democratic_pool_torch got an empty batch")
        sets = [torch.as_tensor(_check_phi(p)) for p in phis]
        dims = {p.shape[1] for p in sets}
        if len(dims) != 1:
            raise ValueError(f"all feature sets must have the same dimension D, got {sorted(dims)}")
        device = sets[0].device if device is None else torch.device(device)
        dtype = sets[0].dtype if sets[0].is_floating_point() else torch.float32
        n_max = max(p.shape[0] for p in sets)
        batch = torch.zeros((len(sets), n_max, dims.pop()), dtype=dtype, device=device)
        for b, p in enumerate(sets):
            batch[b, : p.shape[0]] = p
    if not batch.is_floating_point():
        batch = batch.float()
    weights = democratic_weights_torch(batch, gamma, n_iter)
    return (weights.unsqueeze(-2) @ batch).squeeze(-2)


def aggregate(kind: str, phi: Array, **kwargs) -> Array:
    """Aggregate ``phi`` (n, D) with the method ``kind``: one of ``AGGREGATIONS`` or an alias
    ("avg"/"mean" for average, "demo" for democratic). ``kwargs`` go to the democratic weights
    (``gamma``, ``n_iter``)."""
    name = _ALIASES.get(kind, kind)
    if name == "democratic":
        return democratic_pool(phi, **kwargs)
    if kwargs:
        raise TypeError(f"aggregation {kind!r} takes no parameters, got {sorted(kwargs)}")
    if name == "sum":
        return sum_pool(phi)
    if name == "average":
        return average_pool(phi)
    valid = ", ".join(AGGREGATIONS + tuple(_ALIASES))
    raise ValueError(f"unknown aggregation {kind!r}; valid: {valid}")
