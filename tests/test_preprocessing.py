import numpy as np
import pytest
import torch

from selret.encoding.preprocessing import (
    LocalPCA,
    eigh_descending,
    iter_row_chunks,
    l2_normalize,
    mean_and_covariance,
)


@pytest.fixture
def features():
    """Anisotropic, off-centre 12-dim features: well separated variances along a random basis."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    scales = np.geomspace(10.0, 0.1, 12)
    return (rng.normal(size=(400, 12)) * scales @ basis.T + 5.0).astype(np.float32)


def test_mean_and_covariance_matches_numpy_for_any_chunking(features):
    X = features.astype(np.float64)
    for block in (12, 50, 10_000):
        mean, cov, n = mean_and_covariance(iter_row_chunks(X, block))
        assert n == len(X)
        np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(cov, np.cov(X.T, bias=True), atol=1e-10)


def test_mean_and_covariance_accepts_torch_blocks(features):
    X = features.astype(np.float64)
    ref_mean, ref_cov, _ = mean_and_covariance([X])
    mean, cov, n = mean_and_covariance(iter_row_chunks(torch.from_numpy(features), 120))
    assert n == len(X) and isinstance(cov, np.ndarray)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-10)


def test_mean_and_covariance_rejects_empty_and_ragged_streams():
    with pytest.raises(ValueError, match="no rows"):
        mean_and_covariance([])
    with pytest.raises(ValueError, match="columns"):
        mean_and_covariance([np.ones((2, 3)), np.ones((2, 4))])


def test_eigh_descending_order_sign_convention_and_reconstruction():
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    true_values = np.array([0.5, 9.0, 3.0, 0.1, 4.0, 1.0])
    cov = Q @ np.diag(true_values) @ Q.T
    values, vectors = eigh_descending(cov)
    order = np.argsort(-true_values)
    np.testing.assert_allclose(values, true_values[order], atol=1e-12)
    # each output vector is the true one with the sign that makes its largest entry positive
    expected = Q[:, order]
    expected = expected * np.sign(expected[np.argmax(np.abs(expected), axis=0), np.arange(6)])
    np.testing.assert_allclose(vectors, expected, atol=1e-10)
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, cov, atol=1e-10)


def test_l2_normalize_numpy_torch_and_zero_rows():
    X = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = l2_normalize(X)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    out_t = l2_normalize(torch.from_numpy(X))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out)


def test_local_pca_matches_svd_of_centred_data(features):
    pca = LocalPCA(d=5).fit(features)
    Xc = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    np.testing.assert_allclose(pca.explained_variance_, s[:5] ** 2 / len(Xc), rtol=1e-6)
    # same directions up to sign, in order of decreasing variance
    np.testing.assert_allclose(np.abs(pca.components_.T @ vt[:5].T), np.eye(5), atol=1e-5)
    np.testing.assert_allclose(pca.components_.T @ pca.components_, np.eye(5), atol=1e-6)
    np.testing.assert_allclose(pca.mean_, features.mean(axis=0), rtol=1e-5)


def test_local_pca_transform_is_centred_projection_then_l2(features):
    pca = LocalPCA(d=4).fit(features)
    Y = pca.transform(features[:10])
    assert Y.shape == (10, 4) and Y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), 1.0, rtol=1e-6)
    naive = np.stack(
        [
            (x - pca.mean_) @ pca.components_ / np.linalg.norm((x - pca.mean_) @ pca.components_)
            for x in features[:10]
        ]
    )
    np.testing.assert_allclose(Y, naive, atol=1e-6)
    Yt = pca.transform(torch.from_numpy(features[:10]))
    assert isinstance(Yt, torch.Tensor)
    np.testing.assert_allclose(Yt.numpy(), Y, atol=1e-6)


def test_local_pca_is_deterministic_under_row_order_and_chunking(features):
    a = LocalPCA(d=6).fit(features)
    b = LocalPCA(d=6, max_block_elements=36).fit(features[::-1].copy())
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-5)
    np.testing.assert_allclose(a.mean_, b.mean_, rtol=1e-6)


def test_local_pca_state_round_trip(features):
    pca = LocalPCA(d=3).fit(features)
    state = pca.get_state()
    assert all(isinstance(v, np.ndarray | int | float | str) for v in state.values())
    restored = LocalPCA.from_state(state)
    np.testing.assert_array_equal(restored.transform(features), pca.transform(features))


def test_local_pca_errors(features):
    with pytest.raises(ValueError, match="between 1 and the feature dimension"):
        LocalPCA(d=13).fit(features)
    with pytest.raises(ValueError, match="2-D"):
        LocalPCA(d=2).fit(features[0])
    with pytest.raises(RuntimeError, match="not fitted"):
        LocalPCA(d=2).transform(features)
    pca = LocalPCA(d=2).fit(features)
    with pytest.raises(ValueError, match="12 columns"):
        pca.transform(features[:, :5])
    state = pca.get_state() | {"d": 3}
    with pytest.raises(ValueError, match="inconsistent"):
        LocalPCA.from_state(state)
