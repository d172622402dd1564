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


def gram_democratic_weights(
    gram, scale=None, gamma: float = 0.5, n_iter: int = 10, overwrite: bool = False
):
    """Democratic weights (Jegou & Zisserman 2014) from the Gram matrix of a batch of feature sets.

    ``gram`` (..., n, n) is G = V V^T of n rows v_i (numpy or torch; clamped at 0 here, in place
    with ``overwrite``, else on a copy); the rows aggregated are ``scale_i * v_i`` (``scale`` (..., n), default 1), so
    ``scale = 1 / |v_i|`` aggregates the l2-normalised rows without forming them. Returns w
    (..., n), the democratic weights times ``scale``: the aggregate is ``sum_i w_i v_i``.

    Sinkhorn-like iteration on H = diag(scale) G+ diag(scale): lambda = 1, then ``n_iter`` times
    s = row sums of diag(lambda) H diag(lambda), delta = s^-gamma, lambda <- lambda * delta. The
    row sums are lambda * (H lambda), one matrix-vector product per step (H is never scaled). A zero row (a zero
    feature, a zero scale or padding) gets weight 0 rather than an infinite one, so it neither
    contributes nor changes the other weights: zero-padding a ragged batch is exact.
    """
    if gram.ndim < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be (..., n, n), got shape {tuple(gram.shape)}")
    if gram.shape[-1] == 0:
        raise ValueError("phi has no local feature (n = 0): nothing to aggregate")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    if isinstance(gram, torch.Tensor):
        xp, positive_part = torch, gram.clamp_(min=0) if overwrite else gram.clamp(min=0)
        weights = gram.new_ones(gram.shape[:-1])
    else:
        xp, positive_part = np, np.maximum(gram, 0, out=gram if overwrite else None)
        weights = np.ones(gram.shape[:-1], gram.dtype)
    if scale is not None:
        weights = weights * scale
    # H's row i is zero exactly when G_ii = |v_i|^2 = 0 or scale_i = 0: weight 0 from the start.
    # Every other row keeps s_i >= lambda_i^2 H_ii > 0, so the loop needs no test.
    live = (positive_part.diagonal(0, -2, -1) > 0) & (weights > 0)
    weights = weights * live
    # adding ``dead`` (1 on zero rows, when there are any) keeps 0 / 0 out of them
    dead = None if bool(live.all()) else ~live
    if dead is not None:
        dead = dead.to(weights.dtype) if xp is torch else dead.astype(weights.dtype)
    single = gram.ndim == 2  # a matrix-vector product, without the batch dimension's overhead
    for _ in range(n_iter):
        # with w = lambda * scale: s = w * (G+ w), and lambda * delta times scale is w * s^-gamma
        g = positive_part @ weights if single else (positive_part @ weights[..., None])[..., 0]
        if dead is not None:
            g = g + dead
        if gamma == 0.5:  # the paper's; a square root is several times faster than a power
            weights = xp.sqrt(weights / g)
        else:
            weights = weights * xp.where(weights > 0, weights * g, 1) ** -gamma
    return weights


def democratic_weights_torch(
    phi: torch.Tensor, gamma: float = 0.5, n_iter: int = 10
) -> torch.Tensor:
    """Democratic weights (..., n) of a batch of feature sets ``phi`` (..., n, D): weights lambda
    such that ``lambda_i * phi_i^T psi`` is about the same for every i, with
    psi = sum_i lambda_i phi_i. See ``gram_democratic_weights`` (zero rows get weight 0, so
    zero-padding a ragged batch is exact)."""
    if phi.ndim < 2:
        raise ValueError(f"phi must be (..., n, D), got shape {tuple(phi.shape)}")
    if phi.shape[-2] == 0:
        raise ValueError("phi has no local feature (n = 0): nothing to aggregate")
    if not phi.is_floating_point():
        phi = phi.float()
    return gram_democratic_weights(phi @ phi.transpose(-1, -2), None, gamma, n_iter)


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
