"""Encoder: every Table-3 combination and Table-4 preset fits, saves, loads and gives the stated D."""

from __future__ import annotations

import numpy as np
import pytest

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.encoding.persistence import EncoderFileError
from selret.encoding.presets import COMPARISON_4224, PRESETS, TEMB_DEMOCRATIC
from selret.features import FeatureMap

TABLE3 = [
    ("fv", "average"),
    ("fv", "democratic"),
    ("vlad", "sum"),
    ("vlad", "democratic"),
    ("temb", "democratic"),
    ("faemb", "democratic"),
]
MASKS = ["max", "sum", "sift", "none"]
# Small (d, k) per embedding that still leave dimensions after the paper's drop rule.
SMALL = {"fv": (8, 4), "vlad": (8, 4), "temb": (16, 10), "faemb": (4, 10)}


def synthetic_maps(n: int, seed: int = 0, shape=(64, 8, 10)) -> list[FeatureMap]:
    """Non-negative, spatially smooth-ish maps with a few SIFT keypoints, like ReLU conv output."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        base = rng.gamma(1.0, 1.0, size=(shape[0], 1, 1)) * rng.random(shape)
        f = np.maximum(base + 0.3 * rng.normal(size=shape), 0).astype(np.float32)
        kps = rng.uniform(0, [shape[2] * 32, shape[1] * 32], size=(rng.integers(0, 6), 2))
        maps.append(FeatureMap(f, (shape[1] * 32, shape[2] * 32), kps.astype(np.float32)))
    return maps


@pytest.fixture(scope="module")
def learn_maps():
    return synthetic_maps(24, seed=1)


@pytest.fixture(scope="module")
def test_maps():
    return synthetic_maps(4, seed=2)


@pytest.mark.parametrize(("embedding", "aggregation"), TABLE3)
@pytest.mark.parametrize("mask", MASKS)
def test_table3_combinations_fit_save_load(
    embedding, aggregation, mask, learn_maps, test_maps, tmp_path
):
    d, k = SMALL[embedding]
    config = EncoderConfig(
        embedding=embedding,
        aggregation=aggregation,
        mask=mask,
        d=d,
        k=k,
        kmeans_iters=10,
        kmeans_restarts=1,
    )
    enc = Encoder(config).fit(learn_maps)
    vecs = enc.encode_many(test_maps)
    assert vecs.shape == (4, config.dim)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    path = enc.save(tmp_path / "enc.npz")
    again = Encoder.load(path)
    assert again.config == config
    np.testing.assert_array_equal(again.encode_many(test_maps), vecs)  # bit-identical
    assert again.fingerprint == enc.fingerprint


def test_stated_dimensions_of_presets():
    for dim, (d, k) in TEMB_DEMOCRATIC.items():
        assert EncoderConfig.from_preset(f"temb-demo-{dim}").dim == dim
        assert (
            EncoderConfig.from_preset(f"temb-demo-{dim}").d,
            EncoderConfig.from_preset(f"temb-demo-{dim}").k,
        ) == (d, k)
    for emb in COMPARISON_4224:
        assert EncoderConfig.from_preset(f"{emb}-4224").dim == 4224
    assert len(PRESETS) == 9


def test_preset_512_fits_with_full_dimension_on_few_images(learn_maps, test_maps):
    """24 learning images < 640 dims: the rotation basis is completed, so D stays d*k - 128."""
    maps = synthetic_maps(24, seed=3, shape=(64, 12, 16))
    enc = Encoder(EncoderConfig.from_preset("temb-demo-512", kmeans_iters=10)).fit(maps)
    vecs = enc.encode_many(synthetic_maps(2, seed=4, shape=(64, 12, 16)))
    assert vecs.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_fit_is_reproducible_with_seed_and_differs_without(learn_maps, test_maps):
    cfg = EncoderConfig(embedding="temb", d=16, k=10, kmeans_iters=10)
    a = Encoder(cfg).fit(learn_maps).encode_many(test_maps)
    b = Encoder(cfg).fit(learn_maps).encode_many(test_maps)
    np.testing.assert_array_equal(a, b)
    c = Encoder.from_params(cfg, seed=7).fit(learn_maps).encode_many(test_maps)
    assert not np.array_equal(a, c)


def test_callable_map_source_is_read_twice(learn_maps, test_maps):
    cfg = EncoderConfig(embedding="vlad", aggregation="sum", d=8, k=4, kmeans_iters=10)
    calls = []

    def source():
        calls.append(1)
        return iter(learn_maps)

    a = Encoder(cfg).fit(source).encode_many(test_maps)
    b = Encoder(cfg).fit(learn_maps).encode_many(test_maps)
    np.testing.assert_array_equal(a, b)


def test_mask_fraction_is_recorded(learn_maps):
    fractions = {}
    for mask in ("none", "sum", "max"):
        enc = Encoder(
            EncoderConfig(mask=mask, embedding="vlad", aggregation="sum", d=8, k=4, kmeans_iters=5)
        ).fit(learn_maps)
        fractions[mask] = enc.kept_fraction_
    assert fractions["none"] == 1.0
    assert 0.45 <= fractions["sum"] <= 0.6  # channel sum >= median keeps about half
    assert fractions["max"] < fractions["none"]


def test_config_validation():
    with pytest.raises(ValueError, match="mask"):
        EncoderConfig(mask="bogus")
    with pytest.raises(ValueError, match="embedding"):
        EncoderConfig(embedding="bow")
    with pytest.raises(ValueError, match="leaves nothing"):
        EncoderConfig(embedding="temb", d=8, k=4)
    with pytest.raises(ValueError, match="needs a rotation"):
        EncoderConfig(rotation="none", drop=5)
    assert EncoderConfig(rotation="none", embedding="temb", d=8, k=4).dim == 32
    assert EncoderConfig(aggregation="demo").aggregation == "democratic"
    with pytest.raises(ValueError, match="unknown encoder config"):
        EncoderConfig.from_dict({"nope": 1})


def test_unfitted_and_bad_files(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        Encoder().encode(synthetic_maps(1)[0])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a selret encoder"):
        Encoder.load(bad)
    with pytest.raises(EncoderFileError, match="not found"):
        Encoder.load(tmp_path / "missing.npz")


def test_whitening_option_changes_vectors(learn_maps, test_maps):
    # drop=8 < 23 learned components: with the default 128 every learned component would be
    # dropped and the completed ones all share one scale, so whitening would change nothing.
    base = dict(embedding="temb", d=16, k=10, kmeans_iters=10, drop=8)
    rot = Encoder(EncoderConfig(**base)).fit(learn_maps).encode_many(test_maps)
    whi = (
        Encoder(EncoderConfig(**base, rotation="whitening")).fit(learn_maps).encode_many(test_maps)
    )
    assert rot.shape == whi.shape
    assert not np.allclose(rot, whi)


@pytest.mark.parametrize("embedding", ["temb", "vlad", "fv", "faemb"])
def test_torch_device_path_matches_numpy(embedding, learn_maps, test_maps):
    d, k = SMALL[embedding]
    agg = "average" if embedding == "fv" else "democratic"
    enc = Encoder(
        EncoderConfig(embedding=embedding, aggregation=agg, d=d, k=k, kmeans_iters=5)
    ).fit(learn_maps)
    ref = enc.encode_many(test_maps)
    on_device = enc.encode_many(test_maps, device="cpu")  # the torch path; "cuda" on a GPU machine
    # F-FAemb amplifies float32 rounding through its clamped whitening: a looser bound there.
    np.testing.assert_allclose(on_device, ref, atol=2e-4 if embedding == "faemb" else 2e-5)


def test_auto_device_without_gpu_is_the_numpy_path(learn_maps):
    import torch

    from selret.encoding.encoder import encoding_device

    expected = None if not torch.cuda.is_available() else torch.device("cuda")
    assert encoding_device("auto") == expected
    assert encoding_device("cpu") == torch.device("cpu")
    assert encoding_device(None) is None


def test_encode_many_agrees_with_encode(learn_maps, test_maps):
    # Batched products round differently from single-image ones: agreement to float32 rounding
    # (tests/test_encode_batched.py bounds it against a float64 reference), not bit for bit.
    enc = Encoder(EncoderConfig(embedding="temb", d=16, k=10, kmeans_iters=5)).fit(learn_maps)
    many = enc.encode_many(test_maps)
    single = np.stack([enc.encode(fmap) for fmap in test_maps])
    np.testing.assert_allclose(many, single, atol=1e-3)
    np.testing.assert_allclose(np.sign(many) * many**2, np.sign(single) * single**2, atol=1e-6)


def test_fingerprint_ignores_the_preset_label(learn_maps):
    import dataclasses

    cfg = EncoderConfig(embedding="vlad", aggregation="sum", d=8, k=4, kmeans_iters=5)
    a = Encoder(dataclasses.replace(cfg, preset="one-name")).fit(learn_maps)
    b = Encoder(dataclasses.replace(cfg, preset="another-name")).fit(learn_maps)
    assert a.fingerprint == b.fingerprint


def test_constructor_only_stores_and_learned_state_comes_from_fit(learn_maps):
    from selret.encoding.preprocessing import NotFittedError

    cfg = EncoderConfig(embedding="vlad", aggregation="sum", d=8, k=4, kmeans_iters=5)
    enc = Encoder(cfg)
    assert enc.config is cfg
    assert not [name for name in vars(enc) if name.endswith("_")]
    with pytest.raises(NotFittedError, match="Encoder is not fitted"):
        enc.encode(learn_maps[0])
    enc.fit(learn_maps)
    assert {"pca_", "embedder_", "rotation_"} <= set(vars(enc))


def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path, learn_maps, test_maps):
    enc = Encoder(EncoderConfig(embedding="temb", d=16, k=10, kmeans_iters=5)).fit(learn_maps)
    full = enc.save(tmp_path / "full.npz")
    half = enc.save(tmp_path / "half.npz", precision="float16", provenance={"note": "test"})
    assert half.stat().st_size < 0.6 * full.stat().st_size
    back = Encoder.load(half)
    assert back.provenance_ == {"note": "test"}
    assert all(
        np.asarray(v).dtype != np.float16
        for v in back.get_state().values()
        if isinstance(v, np.ndarray)
    )
    a, b = enc.encode_many(test_maps), back.encode_many(test_maps)
    assert np.abs(a - b).max() < 2e-2  # float16 rounds the matrices at ~5e-4 relative
    assert (np.argsort(-(a @ a.T), 1)[:, 0] == np.argsort(-(b @ b.T), 1)[:, 0]).all()
    assert Encoder.load(full).fingerprint == enc.fingerprint  # float32 is exact


def test_corrupt_encoder_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "encoder.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(EncoderFileError, match="encoder.npz: not a selret encoder file"):
        Encoder.load(bad)
