import numpy as np
import pytest

from selret.encoding.postprocessing import (
    COMPLETION_NOISE,
    Rotation,
    drop_leading,
    drop_start,
    l2_normalize,
    postprocess,
    power_law,
)


def _training(n, d, seed=0, dtype=np.float64):
    # Anisotropic data with a non-zero mean, so that both centring and ordering matter.
    rng = np.random.default_rng(seed)
    scales = np.geomspace(5.0, 0.1, d)
    mixing = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return ((rng.standard_normal((n, d)) * scales) @ mixing + 3.0).astype(dtype)


# ---------------------------------------------------------------- elementwise steps


def test_l2_normalize_hand_cases():
    np.testing.assert_allclose(l2_normalize(np.array([3.0, 4.0])), [0.6, 0.8])
    np.testing.assert_allclose(
        l2_normalize(np.array([[3.0, 4.0], [0.0, -2.0]])), [[0.6, 0.8], [0, -1]]
    )
    np.testing.assert_allclose(
        l2_normalize(np.array([[3.0, 0.0], [4.0, 1.0]]), axis=0), [[0.6, 0], [0.8, 1]]
    )
    np.testing.assert_array_equal(l2_normalize(np.zeros(3)), np.zeros(3))  # no NaN
    assert l2_normalize(np.array([1, 1], np.int64)).dtype.kind == "f"


def test_power_law_hand_cases():
    np.testing.assert_allclose(power_law(np.array([4.0, -9.0, 0.0, 0.25])), [2.0, -3.0, 0.0, 0.5])
    np.testing.assert_allclose(power_law(np.array([-8.0, 27.0]), alpha=1 / 3), [-2.0, 3.0])
    x = np.array([-0.3, 0.7], np.float32)
    out = power_law(x, alpha=1.0)
    np.testing.assert_array_equal(out, x)
    assert out is not x and power_law(x).dtype == np.float32
    with pytest.raises(ValueError, match="alpha"):
        power_law(x, alpha=0.0)


def test_drop_leading():
    x = np.arange(12.0).reshape(2, 6)
    np.testing.assert_array_equal(drop_leading(x, 2), x[:, 2:])
    np.testing.assert_array_equal(drop_leading(x[0], 0), x[0])
    for n in (-1, 6):
        with pytest.raises(ValueError, match="can drop"):
            drop_leading(x, n)


# ---------------------------------------------------------------- Rotation


@pytest.mark.parametrize(("n", "d"), [(200, 12), (6, 20), (20, 20), (2, 7)])
def test_rotation_basis_is_orthonormal_and_complete(n, d):
    x = _training(n, d)
    rot = Rotation().fit(x)
    assert rot.P_.shape == (d, d)
    np.testing.assert_allclose(rot.P_.T @ rot.P_, np.eye(d), atol=1e-12)
    r = min(n - 1, d)
    assert rot.n_components_ == r
    ev = rot.explained_variance_
    assert ev.shape == (d,) and (ev[:r] > 0).all() and (ev[r:] == 0).all()
    assert (np.diff(ev[:r]) <= 0).all()


def test_rotation_leading_components_are_the_pca_of_the_training_set():
    n, d = 8, 30  # N - 1 < D: completion needed
    x = _training(n, d, seed=1)
    rot = Rotation().fit(x)
    y = rot.transform(x)
    r = rot.n_components_
    cov = np.cov(y, rowvar=False)
    # Decorrelated, with the eigenvalues on the diagonal in decreasing order.
    np.testing.assert_allclose(cov[:r, :r], np.diag(rot.explained_variance_[:r]), atol=1e-10)
    # The completed directions carry none of the training variance, and the transformed training
    # set is centred.
    np.testing.assert_allclose(y[:, r:], 0.0, atol=1e-10)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-10)
    # Same eigenvalues as the D x D covariance.
    eig = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(rot.explained_variance_[:r], eig[:r], rtol=1e-8)


def test_rotation_preserves_distances_and_inner_products_of_centred_vectors():
    x = _training(10, 16, seed=2)
    rot = Rotation().fit(x)
    q = np.random.default_rng(3).standard_normal((5, 16))  # new vectors, not in the span
    y = rot.transform(q)
    dist = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dist(y), dist(q), atol=1e-10)
    c = q - rot.mean_
    np.testing.assert_allclose(y @ y.T, c @ c.T, atol=1e-10)


def test_whitening_gives_unit_variance_on_learned_components():
    n, d = 12, 25
    x = _training(n, d, seed=4)
    rot = Rotation(whiten=True, eps=1e-12).fit(x)
    y = rot.transform(x)
    r = rot.n_components_
    np.testing.assert_allclose(np.cov(y[:, :r], rowvar=False), np.eye(r), atol=1e-6)
    # Completed components: scaled like the weakest learned one.
    smallest = rot.explained_variance_[r - 1]
    np.testing.assert_allclose(rot.scale_[r:], 1 / np.sqrt(smallest + 1e-12))
    q = np.random.default_rng(5).standard_normal(d)
    np.testing.assert_allclose(rot.transform(q), ((q - rot.mean_) @ rot.P_) * rot.scale_)
    # Without whitening the scale is one.
    np.testing.assert_array_equal(Rotation().fit(x).scale_, np.ones(d))


def test_rotation_is_deterministic_and_keeps_float32():
    x = _training(9, 14, seed=6, dtype=np.float32)
    a, b = Rotation().fit(x), Rotation().fit(x.copy())
    np.testing.assert_array_equal(a.P_, b.P_)
    assert a.P_.dtype == np.float32 and a.transform(x).dtype == np.float32
    np.testing.assert_allclose(a.P_.T @ a.P_, np.eye(14), atol=1e-5)
    # Sign convention: the largest entry of each learned eigenvector is positive.
    lead = a.P_[:, : a.n_components_]
    assert (lead[np.abs(lead).argmax(0), np.arange(a.n_components_)] > 0).all()


def test_rotation_of_identical_vectors_is_identity():
    x = np.tile(np.array([1.0, -2.0, 0.5]), (4, 1))
    rot = Rotation(whiten=True).fit(x)
    assert rot.n_components_ == 0
    np.testing.assert_array_equal(rot.P_, np.eye(3))
    np.testing.assert_allclose(rot.transform(np.array([2.0, 0.0, 0.0])), [1.0, 2.0, -0.5])


@pytest.mark.parametrize("whiten", [False, True])
def test_rotation_state_round_trip(whiten, tmp_path):
    x = _training(7, 11, seed=7)
    rot = Rotation(whiten=whiten, eps=1e-6).fit(x)
    state = rot.get_state()
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    assert all(isinstance(v, int | float | str) for v in scalars.values())
    np.savez(tmp_path / "rot.npz", **arrays)
    with np.load(tmp_path / "rot.npz") as loaded:
        back = Rotation.from_state({**dict(loaded), **scalars})
    q = np.random.default_rng(8).standard_normal((3, 11))
    np.testing.assert_array_equal(back.transform(q), rot.transform(q))
    assert back.whiten == whiten and back.n_components_ == rot.n_components_


def test_rotation_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        Rotation().fit(np.ones((1, 5)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        Rotation().fit(np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        Rotation().fit(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(RuntimeError, match="not fitted"):
        Rotation().transform(np.ones(3))
    rot = Rotation().fit(_training(5, 4))
    with pytest.raises(ValueError, match="dimension 4"):
        rot.transform(np.ones(5))
    with pytest.raises(ValueError, match="lacks"):
        Rotation.from_state({"whiten": 0})
    state = rot.get_state()
    with pytest.raises(ValueError, match="inconsistent"):
        Rotation.from_state({**state, "P": np.eye(3)})


# ---------------------------------------------------------------- full chain


def test_postprocess_chain_matches_steps_and_gives_unit_vectors():
    # 12 training vectors learn 11 >= 2 * drop directions: the paper's drop applies as it is
    x = _training(12, 20, seed=9)
    rot = Rotation().fit(l2_normalize(x))
    psi = np.random.default_rng(10).standard_normal((4, 20)) + 1.0
    out = postprocess(psi, rot, drop=3, alpha=0.5)
    assert out.shape == (4, 17)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-12)
    steps = rot.transform(psi / np.linalg.norm(psi, axis=1, keepdims=True))[:, 3:]
    steps = np.sign(steps) * np.sqrt(np.abs(steps))
    np.testing.assert_allclose(
        out, steps / np.linalg.norm(steps, axis=1, keepdims=True), rtol=1e-12
    )
    # One vector gives the same as its row in a batch; no rotation / no power law are plain l2.
    np.testing.assert_allclose(postprocess(psi[1], rot, drop=3), out[1], rtol=1e-12)
    np.testing.assert_allclose(postprocess(psi, None, 0, 1.0), l2_normalize(psi), rtol=1e-12)
    # Scaling the aggregated vector changes nothing (first step is l2).
    np.testing.assert_allclose(postprocess(7.0 * psi, rot, drop=3), out, rtol=1e-10)


def test_small_learning_set_keeps_learned_directions_and_zeroes_completion_noise():
    x = l2_normalize(_training(6, 20, seed=9))
    rot = Rotation().fit(x)
    assert rot.n_components_ == 5
    # drop 3 of 5 learned directions would keep 2: the kept window starts at 5 - 3 = 2 instead
    assert drop_start(5, 3) == 2
    new = np.random.default_rng(10).standard_normal(20) + 1.0
    out = postprocess(new, rot, drop=3, alpha=1.0)
    steps = rot.transform(new / np.linalg.norm(new))[2:19]
    np.testing.assert_allclose(out, steps / np.linalg.norm(steps), rtol=1e-12)
    # a training vector lies in the learned span: its completion part is rounding noise, zeroed
    learned = postprocess(x[0], rot, drop=3, alpha=0.5)
    assert np.abs(learned[3:]).max() == 0 and np.abs(learned[:3]).min() > 0
    # the completion of a vector outside the span is kept
    assert np.abs(out[3:]).max() > 100 * COMPLETION_NOISE
