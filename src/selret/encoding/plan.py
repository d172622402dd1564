"""A fitted encoder's learned parameters folded for fast encoding (used by ``batched``).

The stage modules keep each learned step as the paper states it; here the linear steps are
composed once per encoder, in float64, and kept as float32:

- local PCA: ``(x - mean) @ C`` becomes ``x @ C - mean @ C``.
- embedding whitening, W = P P^T with P the whitening projection: P = L M with L lower
  triangular and M orthogonal (the LQ decomposition). The democratic aggregation needs only
  Gram matrices of whitened rows, and Y Y^T = (Phi_c L)(Phi_c L)^T for Y = Phi_c P, so the
  per-feature product is a triangular one, half the multiply-adds of P's. The aggregate then
  only has to be rotated by M, an orthogonal matrix, which keeps the float32 accuracy of
  aggregating whitened rows (aggregating un-whitened rows and whitening the sum would not).
- post-processing: M, the rotation (with its whitening scale) and the dropped components fold
  into one D_emb x D matrix ``out`` and one offset; the l2 norm of the aggregate is M-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selret.encoding.postprocessing import drop_start

Array = np.ndarray


@dataclass(frozen=True, eq=False)
class EncodePlan:
    """Folded parameters of a fitted ``Encoder`` (see the module docstring).

    ``dim`` is the final dimension D; ``pca_projection`` (d, K) = C^T, ``pca_offset`` (d, 1); ``embedder`` the fitted Embedder (kinds
    other than T-emb embed through it), ``codebook`` (k, d) for T-emb; ``embedding_mean``
    (D_emb,) the whitening mean, or None without whitening; ``factor`` (D_emb, D_emb) L, lower
    triangular, in Fortran order (as BLAS takes it), or None without whitening; ``normalize_rows``: whitened
    rows are l2-normalised before aggregation; ``democratic`` and its ``gamma`` / ``n_iter``;
    ``out`` (D_emb, D) and ``offset`` (D,) map the l2-normalised aggregate (in L's basis) to the
    rotated, kept components; the first ``n_learned`` of them are learned rotation directions,
    the rest completion directions of scale ``completion_scale``; ``alpha`` the power law.
    """

    mask: str
    dim: int
    pca_projection: Array
    pca_offset: Array
    embedder: object
    codebook: Array | None
    embedding_mean: Array | None
    factor: Array | None
    normalize_rows: bool
    democratic: bool
    gamma: float
    n_iter: int
    out: Array | None
    offset: Array | None
    n_learned: int
    completion_scale: float
    alpha: float

    @property
    def linear(self) -> bool:
        """Sum / average of rows not normalised: aggregate the embeddings, then whiten the sum."""
        return not self.democratic and not self.normalize_rows


def lq_factor(projection: Array) -> tuple[Array, Array]:
    """(L, M), float64: ``projection = L @ M`` with L lower triangular, M orthogonal."""
    q, r = np.linalg.qr(np.asarray(projection, np.float64).T)
    return r.T, q.T


def build_plan(encoder) -> EncodePlan:
    """The plan of a fitted ``Encoder`` (its learned state is read, never changed)."""
    c = encoder._cfg
    pca, emb, rot = encoder.pca_, encoder.embedder_, encoder.rotation_
    components = np.asarray(pca.components_, np.float32)
    offset = np.asarray(pca.mean_, np.float64) @ components.astype(np.float64)
    whitener = emb.whitener_ if emb.whitens else None
    normalize = whitener is not None and emb.normalize_after_whitening
    d_emb = emb.output_dim
    if whitener is not None:
        lower, orthogonal = lq_factor(whitener.projection_)
        factor = np.asfortranarray(lower, dtype=np.float32)
        mean = np.asarray(whitener.mean_, np.float32)[:, None]  # subtracted from columns
    else:
        orthogonal, factor, mean = None, None, None
    drop, dim = c.effective_drop, c.dim
    if rot is not None:
        start = drop_start(rot.n_components_, drop)
        window = slice(start, start + dim)
        rotate = (np.asarray(rot.P_, np.float64) * rot.scale_)[:, window]
        shift = np.asarray(rot.mean_, np.float64) @ np.asarray(rot.P_, np.float64) * rot.scale_
        n_learned = max(rot.n_components_ - start, 0)
        completion_scale = float(rot.scale_[min(rot.n_components_, d_emb - 1)])
        out = rotate if orthogonal is None else orthogonal @ rotate
        out_offset = np.asarray(shift[window], np.float32)
    else:
        out, out_offset = orthogonal, None
        n_learned, completion_scale = dim, 1.0
    return EncodePlan(
        mask=c.mask,
        dim=dim,
        pca_projection=np.ascontiguousarray(components.T),
        pca_offset=offset.astype(np.float32)[:, None],
        embedder=emb,
        codebook=np.asarray(emb.codebook_, np.float32) if emb.kind == "temb" else None,
        embedding_mean=mean,
        factor=factor,
        normalize_rows=normalize,
        democratic=c.aggregation == "democratic",
        gamma=float(c.democratic_gamma),
        n_iter=int(c.democratic_iters),
        out=None if out is None else np.ascontiguousarray(out, dtype=np.float32),
        offset=out_offset,
        n_learned=n_learned,
        completion_scale=completion_scale,
        alpha=float(c.alpha),
    )


__all__ = ["EncodePlan", "build_plan", "lq_factor"]
