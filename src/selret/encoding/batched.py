"""Batched encoding: the local features of many images through each stage at once.

``encode_local(plan, columns, device)`` takes the kept local features of B images and returns
their (B, D) vectors; ``Encoder.encode`` is the case B = 1 and ``Encoder.encode_many`` feeds it
chunks of maps. Each stage is one or a few large matrix products over all N = sum n_b features,
on the folded parameters of ``plan.EncodePlan`` (features are columns until the aggregation):

    stack     X, the images' kept features side by side               (K, N)
    reduce    Z = l2(C^T X - C^T mean)                                (d, N)       SPEC 3
    embed     Phi_c = T-emb(Z) - mean                                 (D_emb, N)   SPEC 4
    factor    V = Phi_c^T L: whitened rows up to the rotation M       (N, D_emb)
    aggregate per image, democratic weights w from the Gram V_b V_b^T,
              a_b = sum_i w_i V_i                                     (B, D_emb)   SPEC 5
    finish    l2(pow(a_b out / |a_b| - offset)): rotate, drop, power law, l2       SPEC 6

A sum / average of un-normalised rows skips ``factor`` per feature: the sum of an image's
embeddings is multiplied by L once. On the CPU the arrays are numpy (BLAS float32, a triangular
product for ``factor``); with a torch ``device`` they are tensors there, and the Gram matrices are
one batched product over the images zero-padded to the largest n_b (padding rows get weight 0,
which is exact).

Results agree with the stage-by-stage reference (the stage modules) to float32 rounding, and an
image's vector depends on the other images of its batch only through that rounding (BLAS rounds
a row of a matrix product differently depending on the other rows).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch
from scipy.linalg import blas

from selret.encoding.aggregation import gram_democratic_weights
from selret.encoding.masks import compute_mask
from selret.encoding.plan import EncodePlan
from selret.encoding.postprocessing import COMPLETION_NOISE
from selret.features import FeatureMap

Array = np.ndarray | torch.Tensor

_EPS = 1e-12  # as selret.numerics.l2_normalize: a zero row stays zero


def select(plan: EncodePlan, fmap: FeatureMap) -> np.ndarray:
    """(K, n) features the mask keeps, one per column."""
    expected = plan.pca_projection.shape[1]
    if fmap.channels != expected:
        raise ValueError(
            f"the feature map has {fmap.channels} channels, this encoder expects {expected} "
            "(maps of another backbone or layer)"
        )
    mask = compute_mask(plan.mask, fmap).reshape(-1)
    # compress along the contiguous axis is the fastest gather numpy has (the rows of the
    # transposed map, i.e. ``FeatureMap.local_features``, are strided)
    return np.compress(mask, fmap.features.reshape(fmap.channels, -1), axis=1)


def stack(columns: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) local features of B images side by side, and the (B,) counts n_b."""
    if not len(columns):
        raise ValueError("no image to encode")
    counts = np.array([x.shape[1] for x in columns], dtype=np.int64)
    if (counts == 0).any():
        raise ValueError("an image has no local feature (n = 0): nothing to aggregate")
    if len(columns) == 1:
        return np.asarray(columns[0], np.float32), counts
    return np.concatenate(columns, axis=1, dtype=np.float32), counts


# --------------------------------------------------------------------------- numpy / torch
#
# Features are columns until the aggregation: every elementwise step then runs along the long
# axis (N features), which numpy does several times faster than along d = 32 or 64.


def _xp(a: Array):
    return torch if isinstance(a, torch.Tensor) else np


def _clamp_min(a: Array, low: float) -> Array:
    return a.clamp(min=low) if isinstance(a, torch.Tensor) else np.maximum(a, low)


def _column_norms(a: Array) -> Array:
    return _xp(a).sqrt(_xp(a).einsum("ij,ij->j", a, a))


def _row_norms(a: Array) -> Array:
    return _xp(a).sqrt(_xp(a).einsum("ij,ij->i", a, a))


_device_params: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NAMES = ("pca_projection", "pca_offset", "codebook", "embedding_mean", "factor", "out", "offset")


def _params(plan: EncodePlan, like: Array) -> dict[str, Array | None]:
    """The plan's arrays as the kind of ``like``: numpy as they are, or tensors on its device
    (copied once per plan and device: a 4096-D plan holds two 70 MB matrices)."""
    per_device = _device_params.setdefault(plan, {})
    if not isinstance(like, torch.Tensor):
        if None not in per_device:
            per_device[None] = {n: getattr(plan, n) for n in _NAMES}
        return per_device[None]
    if like.device not in per_device:
        per_device[like.device] = {
            n: None
            if getattr(plan, n) is None
            else torch.from_numpy(np.ascontiguousarray(getattr(plan, n))).to(like.device)
            for n in _NAMES
        }
    return per_device[like.device]


# --------------------------------------------------------------------------- stages


def reduce(plan: EncodePlan, X: Array) -> Array:
    """Local PCA of the columns of ``X`` (K, N): (d, N) unit columns of ``C^T X - C^T mean``."""
    p = _params(plan, X)
    Z = p["pca_projection"] @ X
    Z -= p["pca_offset"]
    Z /= _clamp_min(_column_norms(Z), _EPS)
    return Z


def embed(plan: EncodePlan, Z: Array) -> Array:
    """(D_emb, N) embedded columns, centred by the whitening mean when the embedding is whitened.

    T-emb here (the residuals to the k centroids, each l2-normalised, written in place); the
    other kinds through ``Embedder.embed``.
    """
    p = _params(plan, Z)
    if plan.codebook is not None:
        xp = _xp(Z)
        R = Z[None] - p["codebook"][:, :, None]  # (k, d, N)
        inverse = 1 / _clamp_min(xp.sqrt(xp.einsum("kdn,kdn->kn", R, R)), _EPS)
        R *= inverse[:, None, :]
        phi = R.reshape(-1, Z.shape[1])
    else:
        phi = plan.embedder.embed(Z.T).T
    if p["embedding_mean"] is not None:
        phi -= p["embedding_mean"]
    return phi


def factor(plan: EncodePlan, phi: Array) -> Array:
    """(N, D_emb) rows ``phi^T L`` for (D_emb, N) columns ``phi`` (whitening up to the orthogonal
    M); ``phi^T`` itself without whitening. On numpy a triangular product in place (half a dense
    product's work), which overwrites ``phi``.
    """
    rows = phi.T
    if plan.factor is None:
        return rows
    if isinstance(rows, torch.Tensor):
        return rows @ _params(plan, rows)["factor"]
    if rows.flags.f_contiguous:  # V = rows L
        return blas.strmm(1.0, plan.factor, rows, side=1, lower=1, overwrite_b=1)
    # V^T = L^T rows^T, rows^T Fortran-ordered when rows is C-ordered
    rows = np.ascontiguousarray(rows, np.float32)
    return blas.strmm(1.0, plan.factor, rows.T, side=0, lower=1, trans_a=1, overwrite_b=1).T


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)])


def _image_ids(counts: np.ndarray, device) -> torch.Tensor:
    return torch.repeat_interleave(
        torch.arange(len(counts), device=device), torch.as_tensor(counts, device=device)
    )


def segment_sums(phi: Array, counts: np.ndarray) -> Array:
    """(D, B) sums of each image's columns of ``phi`` (D, N), accumulated in float64: a sum of
    many embeddings cancels a lot, and whitening would amplify what float32 loses."""
    if isinstance(phi, torch.Tensor):
        out = phi.new_zeros((phi.shape[0], len(counts)), dtype=torch.float64)
        return out.index_add_(1, _image_ids(counts, phi.device), phi.double()).to(phi.dtype)
    sums = np.add.reduceat(phi, _offsets(counts)[:-1], axis=1, dtype=np.float64)
    return sums.astype(np.float32)


def democratic(plan: EncodePlan, V: Array, counts: np.ndarray) -> Array:
    """(B, D_emb) democratic aggregates of the rows of V, image by image (numpy) or as one
    batch zero-padded to the largest n_b (torch)."""
    if isinstance(V, torch.Tensor):
        ids = _image_ids(counts, V.device)
        starts = torch.as_tensor(_offsets(counts)[:-1], device=V.device)
        padded = V.new_zeros((len(counts), int(counts.max()), V.shape[1]))
        padded[ids, torch.arange(len(V), device=V.device) - starts[ids]] = V
        grams = padded @ padded.transpose(1, 2)
        weights = _gram_weights(plan, grams)
        return (weights[:, None, :] @ padded)[:, 0]
    bounds = _offsets(counts)
    out = np.empty((len(counts), V.shape[1]), np.float32)
    for b in range(len(counts)):
        rows = V[bounds[b] : bounds[b + 1]]
        # a general product: OpenBLAS's symmetric rank-k update is slower here for half the work
        out[b] = _gram_weights(plan, rows @ rows.T) @ rows
    return out


def _gram_weights(plan: EncodePlan, grams: Array) -> Array:
    # |v_i|^2 is the Gram diagonal; padding rows have 0 there and get weight 0
    norms = _xp(grams).sqrt(grams.diagonal(0, -2, -1))
    scale = 1 / _clamp_min(norms, _EPS) if plan.normalize_rows else None
    return gram_democratic_weights(grams, scale, plan.gamma, plan.n_iter, overwrite=True)


def aggregate(plan: EncodePlan, phi: Array, counts: np.ndarray) -> Array:
    """(B, D_emb) aggregates ``a_b`` in L's basis (``psi_b = a_b M``, ``|psi_b| = |a_b|``) of
    the (D_emb, N) embedded columns of B images."""
    if plan.linear:
        return factor(plan, segment_sums(phi, counts))
    V = factor(plan, phi)
    if not plan.democratic:  # a sum of unit rows (no combination Encoder makes; kept exact)
        unit = V / _clamp_min(_row_norms(V), _EPS)[:, None]
        return segment_sums(unit.T, counts).T
    return democratic(plan, V, counts)


def finish(plan: EncodePlan, agg: Array) -> Array:
    """Final (B, D) vectors: l2, rotation and drop (``plan.out``), completion components at
    rounding level zeroed, power law, l2 (``postprocessing.postprocess``, folded)."""
    p = _params(plan, agg)
    xp = _xp(agg)
    norms = _clamp_min(_row_norms(agg), _EPS)
    t = agg @ p["out"] if p["out"] is not None else agg * 1
    t /= norms[:, None]
    if p["offset"] is not None:
        t -= p["offset"]
    if plan.n_learned < plan.dim:
        completion = t[:, plan.n_learned :]
        noise = _row_norms(completion) <= COMPLETION_NOISE * plan.completion_scale
        completion *= (~noise)[:, None]
    if plan.alpha != 1:
        magnitude = xp.sqrt(xp.abs(t)) if plan.alpha == 0.5 else xp.abs(t) ** plan.alpha
        t = xp.copysign(magnitude, t)
    t /= _clamp_min(_row_norms(t), _EPS)[:, None]
    return t


def encode_local(plan: EncodePlan, columns: Sequence[np.ndarray], device=None) -> np.ndarray:
    """(B, D) float32 vectors from the (K, n_b) kept local features (columns) of B images;
    ``device`` None: numpy on the CPU, else a torch device for every stage after the stacking."""
    X, counts = stack(columns)
    if device is not None:
        X = torch.from_numpy(np.ascontiguousarray(X)).to(device)
    out = finish(plan, aggregate(plan, embed(plan, reduce(plan, X)), counts))
    if isinstance(out, torch.Tensor):
        out = out.cpu().numpy()
    return np.asarray(out, np.float32)


def encode_maps(plan: EncodePlan, maps: Sequence[FeatureMap], device=None) -> np.ndarray:
    """(B, D) float32 vectors of ``maps`` (masks on the CPU, the rest as ``encode_local``)."""
    return encode_local(plan, [select(plan, f) for f in maps], device)
