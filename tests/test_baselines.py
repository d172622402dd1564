"""SPoC, MAC, GeM, R-MAC, CroW and PCA-whitening against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selret.evaluation.baselines import (
    BASELINES,
    PCAWhitening,
    compute_baseline,
    crow,
    crow_channel_weights,
    crow_spatial_weights,
    gem,
    mac,
    rmac,
    rmac_regions,
    spoc,
    spoc_weights,
)
from selret.features import FeatureMap


@pytest.fixture
def fmap() -> np.ndarray:
    return np.random.default_rng(0).random((6, 5, 7)).astype(np.float32)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_mac_is_channel_max(fmap):
    np.testing.assert_allclose(mac(fmap), unit(fmap.max(axis=(1, 2))), rtol=1e-6)


def test_spoc(fmap):
    np.testing.assert_allclose(spoc(fmap, centering=False), unit(fmap.sum(axis=(1, 2))), rtol=1e-6)
    # 3 x 3 grid: sigma = (3/2)/3 = 0.5 cells; a cell at distance d weighs exp(-d^2 / 0.5).
    w = spoc_weights(3, 3)
    e1, e2 = math.exp(-2), math.exp(-4)
    np.testing.assert_allclose(w, [[e2, e1, e2], [e1, 1, e1], [e2, e1, e2]], rtol=1e-6)
    np.testing.assert_allclose(
        spoc(fmap[:, :3, :3]), unit((fmap[:, :3, :3] * w).sum(axis=(1, 2))), rtol=1e-5
    )


def test_gem_limits(fmap):
    np.testing.assert_allclose(gem(fmap, p=1), unit(fmap.mean(axis=(1, 2))), rtol=1e-6)
    np.testing.assert_allclose(gem(fmap, p=500), mac(fmap), atol=5e-3)
    assert not np.allclose(gem(fmap, p=3), mac(fmap), atol=5e-3)
    with pytest.raises(ValueError, match="p must be > 0"):
        gem(fmap, p=0)


def test_rmac_regions_24x32():
    # H=24, W=32, L=3 (cirtorch rmac): w = 24; b = (32-24)/(steps-1) = 8, 4, 2.67, ...;
    # overlap 1 - b/w = 0.667, 0.833, ... -> closest to 0.4 is the first, so Wd = 1.
    # l=1: side 24, 2 x 1 regions, step (32-24)/1 = 8 -> left 0, 8.
    # l=2: side floor(48/3) = 16, wl2 = 7: 3 along W (step 8 -> 0, 8, 16), 2 along H (0, 8).
    # l=3: side 12, wl2 = 5: 4 along W (step 20/3 -> floor(5 + 6.67k) - 5 = 0, 6, 13, 20),
    #      3 along H (step 6 -> 0, 6, 12).
    expected = [(0, 0, 24), (0, 8, 24)]
    expected += [(t, x, 16) for t in (0, 8) for x in (0, 8, 16)]
    expected += [(t, x, 12) for t in (0, 6, 12) for x in (0, 6, 13, 20)]
    assert rmac_regions(24, 32, L=3) == expected
    assert len(expected) == 2 + 6 + 12  # cirtorch adds the full map: 21 vectors summed
    # The transposed map gives the transposed regions.
    assert sorted(rmac_regions(32, 24)) == sorted((x, t, s) for t, x, s in expected)


def test_rmac_regions_square():
    # 10 x 10: l=1 the whole map; l=2 side 6, starts 0 and 4; l=3 side 5, wl2 = 1,
    # step 2.5 -> floor(1 + 2.5k) - 1 = 0, 2, 5.
    expected = [(0, 0, 10)] + [(t, x, 6) for t in (0, 4) for x in (0, 4)]
    expected += [(t, x, 5) for t in (0, 2, 5) for x in (0, 2, 5)]
    assert rmac_regions(10, 10) == expected


def test_rmac_sums_normalised_regions():
    F = np.zeros((2, 24, 32), np.float32)
    F[0, 0, 0] = 5.0  # only in the l=1 region at left 0
    F[1, 0, 31] = 0.5  # only in the l=1 region at left 8
    # Regions give [1, 0] and [0, 1] after their l2: the sum is [1, 1], whatever the magnitudes.
    np.testing.assert_allclose(rmac(F, L=1, include_global=False), unit([1, 1]), rtol=1e-6)
    # A square map at L=1 has one region, the whole map: R-MAC = MAC.
    G = np.random.default_rng(1).random((4, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(rmac(G, L=1, include_global=False), mac(G), rtol=1e-6)


def test_crow_weights_hand_case():
    F = np.array([[[1.0, 0.0]], [[1.0, 1.0]]], np.float32)  # K=2, H=1, W=2
    # Channel sums S = [2, 1], ||S||_2 = sqrt(5); spatial weights sqrt(S / sqrt(5)).
    s = np.sqrt(np.array([2.0, 1.0]) / math.sqrt(5))
    np.testing.assert_allclose(crow_spatial_weights(F)[0], s, rtol=1e-6)
    # Non-zero ratios q = [1/2, 1]: weights log(1.5 / 0.5) = log 3 and log(1.5 / 1).
    np.testing.assert_allclose(crow_channel_weights(F), [math.log(3), math.log(1.5)], rtol=1e-6)
    pooled = np.array([s[0] * 1.0, s[0] + s[1]]) * [math.log(3), math.log(1.5)]
    np.testing.assert_allclose(crow(F), unit(pooled), rtol=1e-6)
    # An all-zero channel gets weight 0, and an all-zero map stays a zero vector (no NaN).
    assert crow_channel_weights(np.zeros((2, 2, 2)))[0] == 0.0
    assert not np.isnan(crow(np.zeros((3, 2, 2)))).any()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_is_unit_float32_and_accepts_torch(name, fmap):
    v = compute_baseline(name, fmap)
    assert v.dtype == np.float32 and v.shape == (6,)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(compute_baseline(name, torch.from_numpy(fmap)), v, rtol=1e-6)
    np.testing.assert_allclose(compute_baseline(name, FeatureMap(fmap, (160, 224))), v, rtol=1e-6)


def test_baseline_input_errors(fmap):
    with pytest.raises(ValueError, match="unknown baseline 'vlad'"):
        compute_baseline("vlad", fmap)
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        mac(fmap[0])


def test_pca_whitening_decorrelates_training_data():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(5, 5))
    X = rng.normal(size=(400, 5)) @ mixing + 3.0  # correlated, off-centre
    white = PCAWhitening().fit(X)
    Z = white.transform(X, normalize=False)
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(5), atol=1e-4)
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-5)

    reduced = PCAWhitening(dim=3).fit(X)
    out = reduced.transform(X)
    assert out.shape == (400, 3) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # The kept components are the three of largest variance: the first 3 of the full whitening.
    np.testing.assert_allclose(
        reduced.transform(X, normalize=False), Z[:, :3], rtol=1e-5, atol=1e-5
    )

    restored = PCAWhitening.from_state(reduced.get_state())
    np.testing.assert_array_equal(restored.transform(X[:7]), out[:7])
    assert restored.dim == 3


def test_pca_whitening_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        PCAWhitening().transform(np.ones((2, 3)))
    with pytest.raises(ValueError, match="dim=4 exceeds"):
        PCAWhitening(dim=4).fit(np.random.default_rng(0).normal(size=(10, 3)))
