import numpy as np
import pytest
import torch

from selret.encoding.codebooks import DiagonalGMM, fit_gmm, kmeans
from selret.encoding.embeddings import (
    Embedder,
    EmbeddingWhitener,
    embedding_dim,
    faemb,
    faemb_coefficients,
    faemb_objective,
    fisher_vector,
    gmm_posteriors,
    temb,
    vlad,
)


def unit_rows(rng, n, d):
    X = rng.normal(size=(n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.fixture
def small():
    """n=7 features, k=4 codewords, d=3, float64 so naive references agree to ~1e-12."""
    rng = np.random.default_rng(0)
    return unit_rows(rng, 7, 3), unit_rows(rng, 4, 3)


@pytest.fixture
def gmm_params():
    rng = np.random.default_rng(3)
    weights = rng.uniform(0.5, 2.0, size=4)
    return DiagonalGMM(
        weights / weights.sum(), rng.normal(size=(4, 3)), rng.uniform(0.2, 1.5, size=(4, 3))
    )


@pytest.fixture
def clusters():
    """300 unit-norm 4-dim training features around 5 directions."""
    rng = np.random.default_rng(5)
    centres = unit_rows(rng, 5, 4)
    X = centres[rng.integers(0, 5, size=300)] + 0.15 * rng.normal(size=(300, 4))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------- pure embedding functions


def test_temb_blocks_are_unit_residual_directions(small):
    X, C = small
    out = temb(X, C)
    assert out.shape == (7, 12) and out.dtype == np.float64
    blocks = out.reshape(7, 4, 3)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=2), 1.0, rtol=1e-12)
    for i, x in enumerate(X):
        for j, c in enumerate(C):
            np.testing.assert_allclose(blocks[i, j], (x - c) / np.linalg.norm(x - c), rtol=1e-12)


def test_temb_of_a_feature_on_a_centroid_is_zero_not_nan(small):
    X, C = small
    out = temb(C[:1], C)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, :3], 0.0)


def test_vlad_matches_naive_loop(small):
    X, C = small
    expected = np.zeros((7, 12))
    for i, x in enumerate(X):
        j = int(np.argmin([np.sum((x - c) ** 2) for c in C]))
        expected[i, 3 * j : 3 * j + 3] = x - C[j]
    np.testing.assert_allclose(vlad(X, C), expected, rtol=1e-12, atol=1e-15)


def test_fisher_vector_matches_naive_loop(small, gmm_params):
    X, _ = small
    w, mu, var = gmm_params
    k, d = mu.shape
    expected = np.zeros((7, 2 * k * d))
    for i, x in enumerate(X):
        dens = [
            w[j] * np.prod(np.exp(-((x - mu[j]) ** 2) / (2 * var[j])) / np.sqrt(2 * np.pi * var[j]))
            for j in range(k)
        ]
        post = np.array(dens) / np.sum(dens)
        for j in range(k):
            z = (x - mu[j]) / np.sqrt(var[j])
            expected[i, j * d : (j + 1) * d] = post[j] / np.sqrt(w[j]) * z
            expected[i, (k + j) * d : (k + j + 1) * d] = post[j] / np.sqrt(2 * w[j]) * (z**2 - 1)
    np.testing.assert_allclose(fisher_vector(X, w, mu, var), expected, rtol=1e-10, atol=1e-14)


def test_gmm_posteriors_are_stable_far_from_every_gaussian(gmm_params):
    far = np.full((2, 3), 1e3)  # every density underflows to 0 in float64
    post = gmm_posteriors(far, *gmm_params)
    assert np.all(np.isfinite(post))
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    assert np.all(np.isfinite(fisher_vector(far, *gmm_params)))


def naive_faemb(X, anchors, mu):
    """Per-feature transcription of SPEC 4 with B = anchors^T (d x k)."""
    k, d = anchors.shape
    B = anchors.T
    gammas, rows = [], []
    for x in X:
        A = sum(np.abs(x - b).sum() ** 3 for b in anchors)
        M = np.linalg.inv(B.T @ B + A * mu * np.eye(k))
        one = np.ones(k)
        nu = (one @ M @ B.T @ x - 1) / (one @ M @ one)
        gamma = M @ (B.T @ x - nu * one)
        emb = []
        for j, b in enumerate(anchors):
            r = (x - b) / np.linalg.norm(x - b)
            emb += [gamma[j] * r[a] * r[c] for a in range(d) for c in range(a, d)]
        gammas.append(gamma)
        rows.append(emb)
    return np.array(gammas), np.array(rows)


def test_faemb_matches_naive_loop_and_has_the_right_dimension(small):
    X, B = small
    gamma_ref, emb_ref = naive_faemb(X, B, mu=1e-2)
    np.testing.assert_allclose(faemb_coefficients(X, B, mu=1e-2), gamma_ref, rtol=1e-9)
    out = faemb(X, B, mu=1e-2)
    assert out.shape == (7, embedding_dim("faemb", 4, 3)) == (7, 4 * 3 * 4 // 2)
    np.testing.assert_allclose(out, emb_ref, rtol=1e-9, atol=1e-14)


def test_faemb_gamma_is_the_constrained_minimiser(small):
    X, B = small
    mu = 1e-2
    gamma = faemb_coefficients(X, B, mu=mu)
    # nu is the Lagrange multiplier of sum(gamma) = 1
    np.testing.assert_allclose(gamma.sum(axis=1), 1.0, rtol=1e-12)
    # stationarity: the gradient of the objective is parallel to the constraint normal 1
    A = (np.abs(X[:, None] - B[None]).sum(axis=2) ** 3).sum(axis=1)
    grad = (gamma @ B - X) @ B.T + mu * A[:, None] * gamma
    np.testing.assert_allclose(grad - grad.mean(axis=1, keepdims=True), 0.0, atol=1e-12)
    # and it is a minimum: moving along sum-preserving directions raises the objective
    base = float(faemb_objective(X[:1], B, mu=mu))
    rng = np.random.default_rng(0)
    for _ in range(5):
        step = rng.normal(size=4)
        step -= step.mean()
        g = gamma[0] + 0.05 * step
        perturbed = 0.5 * np.sum((g @ B - X[0]) ** 2) + 0.5 * mu * A[0] * np.sum(g**2)
        assert perturbed > base


def test_functions_accept_torch_and_keep_the_type(small, gmm_params):
    X, C = small
    Xt = torch.from_numpy(X).float()
    for fn, params in ((temb, (C,)), (vlad, (C,)), (faemb, (C,)), (fisher_vector, gmm_params)):
        out = fn(Xt, *params)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), fn(X, *params), atol=1e-5)
    assert temb(X.astype(np.float32), C).dtype == np.float32


def test_embedding_functions_reject_bad_shapes(small, gmm_params):
    X, C = small
    with pytest.raises(ValueError, match="dimension 2 but the local features have 3"):
        temb(X, C[:, :2])
    with pytest.raises(ValueError, match="2-D"):
        vlad(X[0], C)
    w, mu, var = gmm_params
    with pytest.raises(ValueError, match="disagree"):
        fisher_vector(X, w[:3], mu, var)
    with pytest.raises(ValueError, match="positive"):
        fisher_vector(X, w, mu, -var)
    with pytest.raises(ValueError, match="mu"):
        faemb(X, C, mu=0.0)
    with pytest.raises(ValueError, match="unknown embedding kind"):
        embedding_dim("bow", 4, 3)


# ------------------------------------------------------------------- codebooks


def test_kmeans_is_reproducible_and_finds_the_clusters():
    rng = np.random.default_rng(2)
    centres = np.array([[5, 0], [0, 5], [-5, 0], [0, -5]], dtype=np.float32)
    X = centres[rng.integers(0, 4, size=400)] + 0.1 * rng.normal(size=(400, 2))
    a = kmeans(X, 4, seed=7)
    b = kmeans(X, 4, seed=7)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 2) and a.dtype == np.float32
    dist = np.linalg.norm(a[:, None] - centres[None], axis=2)
    assert np.all(dist.min(axis=0) < 0.1)


def test_kmeans_errors():
    X = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="k=4"):
        kmeans(X, 4)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(X[0], 1)


def test_fit_gmm_recovers_a_two_blob_mixture():
    rng = np.random.default_rng(4)
    X = np.concatenate(
        [rng.normal(0, 0.5, size=(600, 2)), rng.normal(6, [1.0, 0.2], size=(200, 2))]
    )
    w, mu, var = fit_gmm(X, 2, seed=0)
    order = np.argsort(mu[:, 0])
    np.testing.assert_allclose(w[order], [0.75, 0.25], atol=0.02)
    np.testing.assert_allclose(mu[order], [[0, 0], [6, 6]], atol=0.15)
    np.testing.assert_allclose(var[order], [[0.25, 0.25], [1.0, 0.04]], rtol=0.25)
    np.testing.assert_array_equal(fit_gmm(X, 2, seed=0).means, mu)


# ------------------------------------------------------------------- whitening


@pytest.fixture
def embeddings():
    """1000 x 20 correlated embeddings with a spread of variances."""
    rng = np.random.default_rng(6)
    return (rng.normal(size=(1000, 20)) * np.geomspace(3, 0.01, 20)) @ rng.normal(
        size=(20, 20)
    ) + 1.0


def test_whitener_eigenvalues_and_clamp(embeddings):
    w = EmbeddingWhitener(n_clamped=5).fit(embeddings)
    raw = np.sort(np.linalg.eigvalsh(np.cov(embeddings.T, bias=True)))[::-1]
    np.testing.assert_allclose(w.eigenvalues_, raw, rtol=1e-8)
    used = w.clamped_eigenvalues_
    np.testing.assert_allclose(used[:15], raw[:15], rtol=1e-5)
    # 1-based lambda_{D-4} = raw[15]: the 5 smallest share its value
    np.testing.assert_allclose(used[15:], raw[15], rtol=1e-5)


def test_whitener_decorrelates_the_training_set(embeddings):
    w = EmbeddingWhitener(n_clamped=5).fit(embeddings)
    Y = w.transform(embeddings)
    np.testing.assert_allclose(Y.mean(axis=0), 0.0, atol=1e-4)
    cov = np.cov(Y.T.astype(np.float64), bias=True)
    ratio = w.eigenvalues_ / w.eigenvalues_[15]
    expected = np.diag(np.concatenate([np.ones(15), ratio[15:]]))
    np.testing.assert_allclose(cov, expected, atol=1e-3)


def test_whitener_chunked_fit_equals_full_fit(embeddings):
    a = EmbeddingWhitener(n_clamped=3).fit(embeddings)
    b = EmbeddingWhitener(n_clamped=3).fit_chunks(np.array_split(embeddings, 7))
    np.testing.assert_allclose(a.projection_, b.projection_, rtol=1e-4, atol=1e-6)


def test_whitener_with_more_clamped_than_dims_is_a_scaled_rotation(embeddings):
    w = EmbeddingWhitener(n_clamped=33).fit(embeddings)
    np.testing.assert_allclose(w.clamped_eigenvalues_, w.eigenvalues_[0], rtol=1e-5)


def test_whitener_state_round_trip_and_errors(embeddings):
    w = EmbeddingWhitener(n_clamped=4).fit(embeddings)
    restored = EmbeddingWhitener.from_state(w.get_state())
    np.testing.assert_array_equal(restored.transform(embeddings), w.transform(embeddings))
    out_t = restored.transform(torch.from_numpy(embeddings))
    np.testing.assert_allclose(out_t.numpy(), w.transform(embeddings), rtol=1e-4, atol=1e-4)
    # the tensor copies are cached per device, and a refit must not reuse them
    restored.fit(embeddings[::-1][:500] * 2.0)
    np.testing.assert_allclose(
        restored.transform(torch.from_numpy(embeddings)).numpy(),
        restored.transform(embeddings),
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="20 columns"):
        w.transform(embeddings[:, :3])
    with pytest.raises(RuntimeError, match="not fitted"):
        EmbeddingWhitener().transform(embeddings)
    with pytest.raises(ValueError, match="zero variance"):
        EmbeddingWhitener().fit(np.ones((5, 3)))


# ------------------------------------------------------------------- Embedder


@pytest.mark.parametrize(
    ("kind", "dim"), [("temb", 5 * 4), ("vlad", 5 * 4), ("fv", 2 * 5 * 4), ("faemb", 5 * 10)]
)
def test_embedder_dimensions_and_state_round_trip(clusters, kind, dim):
    emb = Embedder(kind, k=5, seed=1, n_iter=20, n_clamped=2, faemb_restarts=2).fit(clusters)
    assert emb.output_dim == dim
    out = emb.transform(clusters[:30])
    assert out.shape == (30, dim) and out.dtype == np.float32
    state = emb.get_state()
    assert all(isinstance(v, np.ndarray | int | float | str) for v in state.values())
    restored = Embedder.from_state(state)
    np.testing.assert_array_equal(restored.transform(clusters[:30]), out)
    out_t = restored.transform(torch.from_numpy(clusters[:30]))
    np.testing.assert_allclose(out_t.numpy(), out, atol=1e-4)


def test_embedder_temb_is_whitened_and_democratically_normalised(clusters):
    emb = Embedder("temb", k=5, n_iter=20, n_clamped=2).fit(clusters)
    np.testing.assert_allclose(np.linalg.norm(emb.transform(clusters), axis=1), 1.0, rtol=1e-5)
    raw = temb(clusters, emb.codebook_)
    np.testing.assert_allclose(emb.embed(clusters), raw)
    plain = Embedder("temb", k=5, n_iter=20, n_clamped=2, normalize_after_whitening=False)
    Y = plain.fit(clusters).transform(clusters).astype(np.float64)
    cov = np.cov(Y.T, bias=True)
    np.testing.assert_allclose(np.diag(cov)[:18], 1.0, rtol=1e-3)


def test_embedder_faemb_picks_the_best_anchor_set(clusters):
    emb = Embedder("faemb", k=5, seed=3, n_iter=20, faemb_restarts=3, n_clamped=2).fit(clusters)
    scores = [
        float(faemb_objective(clusters, kmeans(clusters, 5, 20, n_restarts=1, seed=3 + t)))
        for t in range(3)
    ]
    assert float(faemb_objective(clusters, emb.codebook_)) == pytest.approx(min(scores))


def test_embedder_fit_is_reproducible_and_subsamples_for_whitening(clusters):
    a = Embedder("temb", k=5, seed=2, n_iter=20, n_clamped=2, max_whitening_samples=100)
    b = Embedder("temb", k=5, seed=2, n_iter=20, n_clamped=2, max_whitening_samples=100)
    sa, sb = a.fit(clusters).get_state(), b.fit(clusters).get_state()
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key])
    full = Embedder("temb", k=5, seed=2, n_iter=20, n_clamped=2, max_whitening_samples=None)
    assert not np.allclose(full.fit(clusters).whitener_.mean_, a.whitener_.mean_)


def test_embedder_errors(clusters):
    with pytest.raises(ValueError, match="unknown embedding kind"):
        Embedder("bow", k=3).fit(clusters)  # parameters are checked by fit, not the constructor
    with pytest.raises(ValueError, match="at least k"):
        Embedder("vlad", k=10).fit(clusters[:5])
    with pytest.raises(RuntimeError, match="not fitted"):
        Embedder("vlad", k=3).transform(clusters)
    with pytest.raises(RuntimeError, match="not fitted"):
        _ = Embedder("vlad", k=3).output_dim
    emb = Embedder("vlad", k=3, n_iter=5).fit(clusters)
    with pytest.raises(ValueError, match="4 columns"):
        emb.transform(clusters[:, :3])
    state = emb.get_state() | {"k": 4}
    with pytest.raises(ValueError, match="inconsistent"):
        Embedder.from_state(state)
