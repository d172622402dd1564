"""Embeddings of pre-processed local features (SPEC section 4): T-emb, VLAD, FV, F-FAemb.

Local features are rows of X (n, d), float32, unit norm (the output of ``LocalPCA``); the
codebooks (``selret.encoding.codebooks``) are rows too: centroids / anchors C or B are (k, d).

Each embedding formula has exactly one implementation, in torch and vectorised over all n
features (n x k x d broadcasts, which are the size of the output anyway). The public functions
take numpy arrays or torch tensors: numpy in gives numpy out, a tensor in gives a tensor out on
the same device, so the Encoder can run them on a GPU. Computation is in X's float dtype
(float64 stays float64, anything else becomes float32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from selret.encoding.codebooks import (
    best_kmeans,
    check_codebook,
    check_gmm,
    codebook_from_state,
    codebook_state,
    fit_gmm,
    kmeans,
)
from selret.encoding.preprocessing import (
    Array,
    State,
    check_is_fitted,
    check_matrix,
    eigh_descending,
    iter_row_chunks,
    l2_normalize,
    mean_and_covariance,
)

KINDS = ("temb", "vlad", "fv", "faemb")

# Residual norms below this are treated as zero (x on top of a centroid): the normalised
# residual is then 0 instead of NaN.
_EPS = 1e-12


# --------------------------------------------------------------------------- numpy/torch glue


def _as_tensor(A: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    """``A`` as a float tensor: on ``like``'s device and dtype if given, else float32/float64."""
    if not isinstance(A, torch.Tensor):
        A = np.asarray(A)
        # torch warns on read-only buffers (e.g. np.load mmap); copying is cheap next to the work
        A = torch.from_numpy(A if A.flags.writeable else A.copy())
    if like is not None:
        return A.to(device=like.device, dtype=like.dtype)
    return A if A.dtype == torch.float64 else A.float()


def _numpy_or_torch(fn: Callable[..., torch.Tensor]) -> Callable[..., Array]:
    """Run a torch kernel on numpy or torch inputs; return the type of the first argument.

    Every positional argument after the first is cast to the first one's dtype and device.
    """

    @functools.wraps(fn)
    def wrapper(X: Array, *params: Any, **kwargs: Any) -> Array:
        Xt = _as_tensor(X)
        out = fn(Xt, *(_as_tensor(p, like=Xt) for p in params), **kwargs)
        return out if isinstance(X, torch.Tensor) else out.cpu().numpy()

    return wrapper


# --------------------------------------------------------------------------- embeddings


@_numpy_or_torch
def temb(X: Array, C: Array) -> Array:
    """Triangulation embedding (n, k*d): block j is r_j = (x - c_j) / ||x - c_j||.

    Blocks follow the centroid order. Raw embedding: the mean subtraction and whitening of
    SPEC 4 are ``EmbeddingWhitener``'s job.
    """
    check_codebook(X, C, "C")
    R = l2_normalize(X[:, None, :] - C[None, :, :], eps=_EPS)
    return R.reshape(X.shape[0], -1)


@_numpy_or_torch
def vlad(X: Array, C: Array) -> Array:
    """VLAD embedding (n, k*d): x - c_nn in the block of the nearest centroid, zeros elsewhere.

    Ties go to the lowest centroid index.
    """
    check_codebook(X, C, "C")
    n, d = X.shape
    residuals = X[:, None, :] - C[None, :, :]
    # distances from the explicit residuals, not |x|^2 - 2x.c + |c|^2, so near-ties are exact
    nearest = (residuals**2).sum(dim=2).argmin(dim=1)
    rows = torch.arange(n, device=X.device)
    out = torch.zeros_like(residuals)
    out[rows, nearest] = residuals[rows, nearest]
    return out.reshape(n, -1)


def _standardise(
    X: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated GMM parameters -> (Z (n, k, d) = (x - mu_i) / sigma_i, posteriors (n, k)).

    Posteriors come from log-sum-exp (softmax) of the log joint densities, stable for features
    far from every Gaussian, where the densities themselves underflow.
    """
    check_codebook(X, means, "means")
    check_gmm(weights, means, variances)
    Z = (X[:, None, :] - means) / variances.sqrt()
    # the (2 pi)^(-d/2) factor is common to every Gaussian and cancels in the softmax
    log_joint = torch.log(weights) - 0.5 * torch.log(variances).sum(dim=1) - 0.5 * (Z**2).sum(2)
    return Z, torch.softmax(log_joint, dim=1)


@_numpy_or_torch
def gmm_posteriors(X: Array, weights: Array, means: Array, variances: Array) -> Array:
    """Posterior probabilities p_i(x) (n, k) of a diagonal GMM (``weights``, ``means``,
    ``variances`` as in ``DiagonalGMM``), computed stably in the log domain."""
    return _standardise(X, weights, means, variances)[1]


@_numpy_or_torch
def fisher_vector(X: Array, weights: Array, means: Array, variances: Array) -> Array:
    """Fisher vector (n, 2*k*d) of each feature under a diagonal GMM.

    Layout ``[u_1 .. u_k, v_1 .. v_k]``, each block d long, with
    u_i = p_i(x) / sqrt(w_i) * (x - mu_i) / sigma_i and
    v_i = p_i(x) / sqrt(2 w_i) * (((x - mu_i) / sigma_i)^2 - 1).
    """
    Z, posteriors = _standardise(X, weights, means, variances)
    n = X.shape[0]
    u = (posteriors / weights.sqrt())[:, :, None] * Z
    v = (posteriors / (2 * weights).sqrt())[:, :, None] * (Z**2 - 1)
    return torch.cat([u.reshape(n, -1), v.reshape(n, -1)], dim=1)


@_numpy_or_torch
def faemb_coefficients(X: Array, B: Array, mu: float = 1e-2) -> Array:
    """F-FAemb weights gamma (n, k) of each feature on the anchors B (k, d), in closed form.

    gamma minimises 1/2 ||x - B^T gamma||^2 + mu/2 * A(x) ||gamma||^2 subject to
    sum(gamma) = 1, with A(x) = sum_j ||x - b_j||_1^3. With G = B B^T (k x k),
    M = (G + A mu I)^-1, nu = (1^T M B x - 1) / (1^T M 1) is the Lagrange multiplier of the
    constraint and gamma = M (B x - nu 1), so 1^T gamma = 1 exactly.
    """
    check_codebook(X, B, "B")
    if mu <= 0:
        raise ValueError(f"mu={mu} must be positive")
    # k x k systems are cheap and ill-conditioned when anchors are close: solve in float64
    X64, B64 = X.double(), B.double()
    A = ((X64[:, None, :] - B64[None, :, :]).abs().sum(dim=2) ** 3).sum(dim=1)  # (n,)
    # G = U diag(s) U^T is shared by every x, so M(x) = U diag(1 / (s + A mu)) U^T applies
    # to all n features with two matmuls instead of n separate solves.
    s, U = torch.linalg.eigh(B64 @ B64.T)
    inv_diag = 1.0 / (s[None, :] + mu * A[:, None])  # (n, k)
    Bx = X64 @ B64.T  # (n, k): rows are (B x)^T
    M_Bx = ((Bx @ U) * inv_diag) @ U.T
    M_1 = (U.sum(dim=0)[None, :] * inv_diag) @ U.T  # M 1 per feature, (n, k)
    nu = (M_1 * Bx).sum(dim=1) - 1.0  # 1^T M B x - 1 (M is symmetric)
    nu = nu / M_1.sum(dim=1)
    return (M_Bx - nu[:, None] * M_1).to(X.dtype)


@_numpy_or_torch
def faemb_objective(X: Array, B: Array, mu: float = 1e-2) -> Array:
    """F-FAemb objective (0-d) at the closed-form gamma: sum over features of
    1/2 ||x - B^T gamma||^2 + mu/2 * ||gamma||^2 * sum_j ||x - b_j||_1^3.

    Used to pick the best of several k-means anchor sets (reference ``init_B_by_kmeans``).
    """
    gamma = faemb_coefficients(X, B, mu=mu).double()
    X64, B64 = X.double(), B.double()
    reconstruction = ((gamma @ B64 - X64) ** 2).sum()
    A = ((X64[:, None, :] - B64[None, :, :]).abs().sum(dim=2) ** 3).sum(dim=1)
    return 0.5 * reconstruction + 0.5 * mu * ((gamma**2).sum(dim=1) * A).sum()


@_numpy_or_torch
def faemb(X: Array, B: Array, mu: float = 1e-2) -> Array:
    """F-FAemb embedding (n, k*d*(d+1)/2).

    Block j is gamma_j times the upper triangle (diagonal included, row-major: (0,0), (0,1),
    ..., (0,d-1), (1,1), ...) of r_j r_j^T with r_j = (x - b_j) / ||x - b_j||.
    """
    gamma = faemb_coefficients(X, B, mu=mu)  # validates shapes and mu
    n, d = X.shape
    R = temb(X, B).reshape(n, B.shape[0], d)
    rows, cols = torch.triu_indices(d, d, device=X.device)
    return (gamma[:, :, None] * R[:, :, rows] * R[:, :, cols]).reshape(n, -1)


def embedding_dim(kind: str, k: int, d: int) -> int:
    """Output dimension of one embedded feature: temb/vlad k*d, fv 2*k*d, faemb k*d*(d+1)/2."""
    dims = {"temb": k * d, "vlad": k * d, "fv": 2 * k * d, "faemb": k * d * (d + 1) // 2}
    if kind not in dims:
        raise ValueError(f"unknown embedding kind {kind!r}; expected one of {KINDS}")
    return dims[kind]


# --------------------------------------------------------------------------- whitening


class EmbeddingWhitener:
    """Centring and PCA-whitening of embedded features with clamped small eigenvalues (SPEC 4).

    ``fit`` eigen-decomposes the covariance of the centred training embeddings (accumulated in
    float64 row blocks), eigenvalues lambda_1 >= ... >= lambda_D in ``eigenvalues_``. Clamp:
    lambda_i <- max(lambda_i, lambda_{D - n_clamped + 1}) (1-based), so the ``n_clamped``
    smallest share one value (reference: 33 for T-emb, 129 for F-FAemb); with
    ``n_clamped >= D`` every eigenvalue becomes lambda_1; eigenvalues <= ``rcond * lambda_1`` (no
    variance in the samples: fewer samples than D) take the smallest larger one. ``projection_`` is
    V diag(lambda^-1/2) and ``transform(Phi) = (Phi - mean_) @ projection_``.
    """

    # Eigenvalues <= rcond * lambda_1 count as 0: rounding gives ~1e-16 there, genuine small ones
    rcond = 1e-10  # are 1e-7 and up (the shipped encoders: >= 3e-7)

    def __init__(self, n_clamped: int = 33, max_block_elements: int = 1 << 22):
        self.n_clamped = n_clamped
        self.max_block_elements = max_block_elements

    def fit(self, Phi: Any) -> EmbeddingWhitener:
        """Learn from (N, D) embeddings (any row-sliceable 2-D array)."""
        check_matrix(Phi, "Phi")
        return self.fit_chunks(iter_row_chunks(Phi, self.max_block_elements))

    def fit_chunks(self, chunks: Iterable[Any]) -> EmbeddingWhitener:
        """Learn from a stream of (m, D) row blocks, so the N x D matrix need never exist."""
        if self.n_clamped < 0:
            raise ValueError(f"n_clamped={self.n_clamped} must be >= 0")
        mean, cov, _ = mean_and_covariance(chunks)
        values, vectors = eigh_descending(cov)
        if values[0] <= 0:
            raise ValueError("the embeddings have zero variance; cannot whiten")
        D = values.size
        if self.n_clamped > 0:
            values_used = np.maximum(values, values[max(D - self.n_clamped, 0)])
        else:
            values_used = values
        # no variance learned there: 1/sqrt(rcond) would blow float32 rounding up to about 1e-3
        values_used = np.maximum(values_used, values[values > self.rcond * values[0]][-1])
        self.mean_ = mean.astype(np.float32)
        self.eigenvalues_ = values
        self.projection_ = np.ascontiguousarray(vectors / np.sqrt(values_used), dtype=np.float32)
        return self

    def _on_device(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean_ and projection_ as tensors like ``like``, cached: a D x D projection is too big
        to copy to the GPU on every call. The cache holds the source arrays, so a refit or a
        reassignment (a new array object) invalidates it."""
        sources = (self.mean_, self.projection_)
        key = (like.device, like.dtype, *map(id, sources))
        cache = getattr(self, "_device_cache", None)
        if cache is None or cache[0] != key:
            # holding the sources keeps their ids from being reused while the cache lives
            self._device_cache = cache = (key, sources, [_as_tensor(a, like=like) for a in sources])
        return cache[2]

    @property
    def clamped_eigenvalues_(self) -> np.ndarray:
        """The eigenvalues actually used for scaling: 1 / squared column norms of projection_."""
        check_is_fitted(self, "projection_")
        return 1.0 / (self.projection_.astype(np.float64) ** 2).sum(axis=0)

    def transform(self, Phi: Array) -> Array:
        """(n, D) whitened embeddings ``(Phi - mean_) @ projection_``; numpy or torch."""
        check_is_fitted(self, "mean_", "projection_")
        check_matrix(Phi, "Phi", n_cols=self.mean_.size)
        if isinstance(Phi, torch.Tensor):
            Phi = _as_tensor(Phi)
            mean, projection = self._on_device(Phi)
            return (Phi - mean) @ projection
        Phi = np.asarray(Phi, dtype=np.float32)
        return (Phi - self.mean_) @ self.projection_

    def get_state(self) -> State:
        check_is_fitted(self, "mean_", "projection_")
        return {
            "n_clamped": int(self.n_clamped),
            "mean": self.mean_,
            "eigenvalues": self.eigenvalues_,
            "projection": self.projection_,
        }

    @classmethod
    def from_state(cls, state: State) -> EmbeddingWhitener:
        whitener = cls(n_clamped=int(state["n_clamped"]))
        whitener.mean_ = np.asarray(state["mean"], dtype=np.float32)
        whitener.eigenvalues_ = np.asarray(state["eigenvalues"], dtype=np.float64)
        whitener.projection_ = np.asarray(state["projection"], dtype=np.float32)
        D = whitener.mean_.size
        if whitener.projection_.shape != (D, D):
            raise ValueError(
                f"inconsistent EmbeddingWhitener state: mean {whitener.mean_.shape}, "
                f"projection {whitener.projection_.shape}"
            )
        return whitener


# --------------------------------------------------------------------------- estimator


class Embedder:
    """Learned embedding of local features: one of ``"temb" | "vlad" | "fv" | "faemb"``.

    ``fit(X)`` learns the codebook on pre-processed training features X (n, d): k-means
    centroids (temb, vlad; ``n_iter`` iterations, ``n_restarts`` restarts), a diagonal GMM (fv),
    or the best of ``faemb_restarts`` k-means runs by the F-FAemb objective (faemb). When
    whitening (default for temb and faemb) it then fits an ``EmbeddingWhitener`` with
    ``n_clamped`` clamped eigenvalues (default 33 for temb, 129 for faemb) on the embeddings of
    at most ``max_whitening_samples`` seeded randomly chosen training rows (None: all rows);
    the same rows score the faemb anchor sets.

    ``transform(X)`` gives (n, output_dim): the raw embedding, then, when whitening, the
    whitened one, l2-normalised per feature if ``normalize_after_whitening`` (the democratic
    variant; False gives the plain sum-aggregation variant).

    Learned state: ``codebook_`` (k, d) for temb/vlad/faemb, ``gmm_`` for fv, ``whitener_``.
    """

    def __init__(
        self,
        kind: str,
        k: int,
        seed: int = 0,
        *,
        n_iter: int = 100,
        n_restarts: int = 2,
        faemb_restarts: int = 5,
        mu: float = 1e-2,
        whiten: bool | None = None,
        n_clamped: int | None = None,
        normalize_after_whitening: bool = True,
        max_whitening_samples: int | None = 200_000,
    ):
        self.kind = kind
        self.k = k
        self.seed = seed
        self.n_iter = n_iter
        self.n_restarts = n_restarts
        self.faemb_restarts = faemb_restarts
        self.mu = mu
        self.whiten = whiten
        self.n_clamped = n_clamped
        self.normalize_after_whitening = normalize_after_whitening
        self.max_whitening_samples = max_whitening_samples

    # Constructor parameters are stored as given (None = the paper's choice for the kind).
    @property
    def whitens(self) -> bool:
        """Whether embeddings are whitened: ``whiten``, or by default for T-emb and F-FAemb."""
        return self.kind in ("temb", "faemb") if self.whiten is None else bool(self.whiten)

    @property
    def clamped(self) -> int:
        """Eigenvalues clamped by the whitening: ``n_clamped``, or 129 (F-FAemb) / 33 (others)."""
        return (129 if self.kind == "faemb" else 33) if self.n_clamped is None else self.n_clamped

    @property
    def output_dim(self) -> int:
        """Dimension of one embedded feature (fitted): temb/vlad k*d, fv 2*k*d, faemb k*d(d+1)/2."""
        check_is_fitted(self, "n_features_in_")
        return embedding_dim(self.kind, self.k, self.n_features_in_)

    def _sample_rows(self, n: int) -> np.ndarray:
        m = self.max_whitening_samples
        if m is None or m >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(self.seed).choice(n, size=m, replace=False))

    def fit(self, X: Array, device: str | torch.device | None = None) -> Embedder:
        """Learn the codebook (and whitening) from (n, d) pre-processed training features.

        ``device`` (e.g. ``"cuda"``) is where the training embeddings and their covariance
        are computed; k-means and the GMM run on the CPU.
        """
        if self.kind not in KINDS:
            raise ValueError(f"unknown embedding kind {self.kind!r}; expected one of {KINDS}")
        if self.k < 1:
            raise ValueError(f"k={self.k} must be >= 1")
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        X = np.ascontiguousarray(X, dtype=np.float32)
        check_matrix(X)
        n, d = X.shape
        if n < self.k:
            raise ValueError(f"k={self.k} needs at least k training features, got n={n}")
        sample_t = torch.from_numpy(X[self._sample_rows(n)]).to(device or "cpu")
        self.codebook_ = self.gmm_ = self.whitener_ = None
        if self.kind == "fv":
            self.gmm_ = fit_gmm(X, self.k, seed=self.seed, n_iter=self.n_iter)
        elif self.kind == "faemb":
            # the objective is a sum over features: score in blocks of ~4M n*k*d entries
            blocks = list(iter_row_chunks(sample_t, (1 << 22) // self.k))

            def objective(B: np.ndarray) -> float:
                return sum(float(faemb_objective(b, B, mu=self.mu)) for b in blocks)

            self.codebook_ = best_kmeans(
                X, self.k, objective, self.n_iter, self.faemb_restarts, seed=self.seed
            )
        else:
            self.codebook_ = kmeans(X, self.k, self.n_iter, self.n_restarts, seed=self.seed)
        self.n_features_in_ = d
        if self.whitens:
            # the embedded sample is D times wider than X: stream it in blocks into the whitener
            chunks = (
                self.embed(block)
                for block in iter_row_chunks(sample_t, (1 << 22) * d // self.output_dim)
            )
            self.whitener_ = EmbeddingWhitener(self.clamped).fit_chunks(chunks)
        return self

    def embed(self, X: Array) -> Array:
        """Raw (un-whitened) embedding (n, output_dim) of (n, d) features; numpy or torch."""
        check_is_fitted(self, "n_features_in_")
        check_matrix(X, n_cols=self.n_features_in_)
        if self.kind == "temb":
            return temb(X, self.codebook_)
        if self.kind == "vlad":
            return vlad(X, self.codebook_)
        if self.kind == "faemb":
            return faemb(X, self.codebook_, mu=self.mu)
        return fisher_vector(X, *self.gmm_)

    def transform(self, X: Array) -> Array:
        """(n, output_dim) embedded (and, if configured, whitened and l2-normalised) features."""
        Phi = self.embed(X)
        if not self.whitens:
            return Phi
        Phi = self.whitener_.transform(Phi)
        return l2_normalize(Phi) if self.normalize_after_whitening else Phi

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)

    def get_state(self) -> State:
        check_is_fitted(self, "n_features_in_")
        max_samples = self.max_whitening_samples
        state: State = {
            "kind": self.kind,
            "k": int(self.k),
            "seed": int(self.seed),
            "n_iter": int(self.n_iter),
            "n_restarts": int(self.n_restarts),
            "faemb_restarts": int(self.faemb_restarts),
            "mu": float(self.mu),
            "whiten": int(self.whitens),
            "n_clamped": int(self.clamped),
            "normalize_after_whitening": int(self.normalize_after_whitening),
            # npz/JSON have no None: -1 means "use every row"
            "max_whitening_samples": -1 if max_samples is None else int(max_samples),
            "n_features_in": int(self.n_features_in_),
        }
        state |= codebook_state(self.codebook_ if self.gmm_ is None else self.gmm_)
        if self.whitener_ is not None:
            state |= {f"whitener.{key}": v for key, v in self.whitener_.get_state().items()}
        return state

    @classmethod
    def from_state(cls, state: State) -> Embedder:
        max_samples = int(state["max_whitening_samples"])
        emb = cls(
            str(state["kind"]),
            int(state["k"]),
            seed=int(state["seed"]),
            n_iter=int(state["n_iter"]),
            n_restarts=int(state["n_restarts"]),
            faemb_restarts=int(state["faemb_restarts"]),
            mu=float(state["mu"]),
            whiten=bool(int(state["whiten"])),
            n_clamped=int(state["n_clamped"]),
            normalize_after_whitening=bool(int(state["normalize_after_whitening"])),
            max_whitening_samples=None if max_samples < 0 else max_samples,
        )
        emb.n_features_in_ = int(state["n_features_in"])
        codebook = codebook_from_state(state, emb.kind == "fv", (emb.k, emb.n_features_in_))
        emb.gmm_, emb.codebook_ = (codebook, None) if emb.kind == "fv" else (None, codebook)
        emb.whitener_ = None
        if emb.whitens:
            prefix = "whitener."
            emb.whitener_ = EmbeddingWhitener.from_state(
                {key[len(prefix) :]: v for key, v in state.items() if key.startswith(prefix)}
            )
            if emb.whitener_.mean_.size != emb.output_dim:
                raise ValueError("inconsistent Embedder state: whitener dimension")
        return emb
