import numpy as np
import pytest
import torch

from selret.encoding.aggregation import (
    AGGREGATIONS,
    aggregate,
    average_pool,
    democratic_pool,
    democratic_pool_torch,
    democratic_weights,
    democratic_weights_torch,
    sum_pool,
)


def naive_democratic_weights(phi, gamma=0.5, n_iter=10):
    """Element-by-element transcription of the reference algorithm (float64)."""
    n = len(phi)
    gram = [[max(0.0, float(np.dot(phi[i], phi[j]))) for j in range(n)] for i in range(n)]
    lam = [1.0] * n
    for _ in range(n_iter):
        sums = [sum(gram[i][j] for i in range(n)) for j in range(n)]  # column sums
        delta = [s**-gamma for s in sums]
        gram = [[delta[i] * gram[i][j] * delta[j] for j in range(n)] for i in range(n)]
        lam = [lam[i] * delta[i] for i in range(n)]
    return np.array(lam)


def _unit_rows(rng, n, d, offset):
    # Unit rows around offset * (1, ..., 1); larger offsets give tighter bursts.
    x = rng.standard_normal((n, d)) + offset
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_democratic_weights_match_naive_loop():
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((7, 5))  # has negative dot products: exercises the clipping
    expected = naive_democratic_weights(phi, gamma=0.5, n_iter=10)
    np.testing.assert_allclose(democratic_weights(phi), expected, rtol=1e-10)
    np.testing.assert_allclose(
        democratic_weights(phi, gamma=0.3, n_iter=3),
        naive_democratic_weights(phi, gamma=0.3, n_iter=3),
        rtol=1e-10,
    )
    np.testing.assert_allclose(democratic_pool(phi), expected @ phi, rtol=1e-10)
    # float32 keeps its dtype and agrees to float32 precision.
    w32 = democratic_weights(phi.astype(np.float32))
    assert w32.dtype == np.float32
    np.testing.assert_allclose(w32, expected, rtol=1e-4)


def test_democratic_equalises_contributions():
    rng = np.random.default_rng(1)
    # A dense cluster of near-duplicates plus scattered features: the burst must be down-weighted.
    burst = _unit_rows(rng, 30, 16, 4.0)
    scattered = _unit_rows(rng, 10, 16, 1.5)
    phi = np.vstack([burst, scattered])
    # The property is exact for the clipped Gram; with every correlation positive it holds for
    # the plain inner products too.
    assert (phi @ phi.T > 0).all()
    lam = democratic_weights(phi, n_iter=50)
    psi = lam @ phi
    contrib = lam * (phi @ psi)
    assert contrib.std() / contrib.mean() < 1e-8
    # Unweighted sum pooling is far from democratic on the same data.
    raw = phi @ phi.sum(0)
    assert raw.std() / raw.mean() > 0.05
    # Burst members get smaller weights than scattered ones.
    assert lam[:30].mean() < lam[30:].mean()
    # With the default 10 iterations it is already close.
    lam10 = democratic_weights(phi)
    c10 = lam10 * (phi @ (lam10 @ phi))
    assert c10.std() / c10.mean() < 1e-3


def test_sum_and_average_hand_cases():
    phi = np.array([[1.0, 2.0, 0.0], [3.0, -1.0, 4.0]], np.float32)
    np.testing.assert_array_equal(sum_pool(phi), [4.0, 1.0, 4.0])
    np.testing.assert_array_equal(average_pool(phi), [2.0, 0.5, 2.0])
    np.testing.assert_array_equal(aggregate("sum", phi), [4.0, 1.0, 4.0])
    np.testing.assert_array_equal(aggregate("avg", phi), [2.0, 0.5, 2.0])
    np.testing.assert_array_equal(aggregate("average", phi), [2.0, 0.5, 2.0])


def test_single_feature():
    phi = np.array([[3.0, 4.0]])
    # s = 25, delta = 1/5, G -> 1, then delta = 1 forever: lambda = 1/5 = 1/|phi|.
    np.testing.assert_allclose(democratic_weights(phi), [0.2])
    np.testing.assert_allclose(democratic_pool(phi), [0.6, 0.8])
    np.testing.assert_array_equal(sum_pool(phi), [3.0, 4.0])
    np.testing.assert_array_equal(average_pool(phi), [3.0, 4.0])


def test_zero_feature_gets_zero_weight_and_changes_nothing():
    rng = np.random.default_rng(2)
    phi = _unit_rows(rng, 6, 4, 1.0)
    with_zero = np.vstack([phi[:3], np.zeros((1, 4)), phi[3:]])
    lam = democratic_weights(with_zero)
    assert np.isfinite(lam).all() and lam[3] == 0.0
    np.testing.assert_allclose(np.delete(lam, 3), democratic_weights(phi), rtol=1e-12)


def test_empty_and_bad_shapes_raise():
    for fn in (sum_pool, average_pool, democratic_weights, democratic_pool):
        with pytest.raises(ValueError, match="n = 0"):
            fn(np.zeros((0, 8)))
        with pytest.raises(ValueError, match=r"\(n, D\)"):
            fn(np.zeros(8))
    with pytest.raises(ValueError, match="n = 0"):
        democratic_weights_torch(torch.zeros(2, 0, 3))
    with pytest.raises(ValueError, match="n_iter"):
        democratic_weights(np.ones((2, 2)), n_iter=-1)


def test_aggregate_dispatch():
    rng = np.random.default_rng(3)
    phi = _unit_rows(rng, 5, 3, 1.0)
    np.testing.assert_allclose(aggregate("democratic", phi), democratic_pool(phi))
    np.testing.assert_allclose(aggregate("demo", phi, gamma=0.3), democratic_pool(phi, gamma=0.3))
    assert AGGREGATIONS == ("sum", "average", "democratic")
    with pytest.raises(ValueError, match="sum, average, democratic"):
        aggregate("max", phi)
    with pytest.raises(TypeError, match="no parameters"):
        aggregate("sum", phi, gamma=0.5)


def test_torch_inputs_give_torch_outputs_equal_to_numpy():
    rng = np.random.default_rng(4)
    phi = rng.standard_normal((9, 6)).astype(np.float32)
    t = torch.from_numpy(phi.copy())
    for kind in AGGREGATIONS:
        out = aggregate(kind, t)
        assert isinstance(out, torch.Tensor) and out.shape == (6,)
        np.testing.assert_allclose(out.numpy(), aggregate(kind, phi), rtol=1e-5, atol=1e-6)
    w = democratic_weights(t)
    assert isinstance(w, torch.Tensor)
    np.testing.assert_allclose(w.numpy(), democratic_weights(phi), rtol=1e-6)


def test_batched_ragged_matches_per_image():
    rng = np.random.default_rng(5)
    sets = [rng.standard_normal((n, 8)) for n in (3, 11, 1, 6)]
    batched = democratic_pool_torch([torch.from_numpy(s) for s in sets])
    assert batched.shape == (4, 8) and batched.dtype == torch.float64
    for b, s in enumerate(sets):
        np.testing.assert_allclose(batched[b].numpy(), democratic_pool(s), rtol=1e-10, atol=1e-12)
    # numpy sets and a dense (B, n, D) tensor go through the same code.
    np.testing.assert_allclose(democratic_pool_torch(sets).numpy(), batched.numpy())
    dense = torch.from_numpy(np.stack([s[:3] for s in sets if len(s) >= 3]))
    expected = np.stack([democratic_pool(s[:3]) for s in sets if len(s) >= 3])
    np.testing.assert_allclose(democratic_pool_torch(dense).numpy(), expected, rtol=1e-10)


def test_batched_bad_input():
    with pytest.raises(ValueError, match="empty batch"):
        democratic_pool_torch([])
    with pytest.raises(ValueError, match="same dimension"):
        democratic_pool_torch([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ValueError, match=r"\(B, n, D\)"):
        democratic_pool_torch(torch.ones(2, 3))
