"""Batched encoding (selret.encoding.batched) against a plain float64 implementation of the method.

``reference_encode`` below is the method written out stage by stage as SPEC sections 2-6 state it,
in float64, with no folding, batching or BLAS tricks; it stays here as the definition the fast
path must reproduce. Vectors are compared with ``assert_same_vectors``: the power law's slope is
infinite at 0, so a component within float32 rounding of 0 before it can move by up to
sqrt(rounding) after it. The comparison therefore undoes the power law (sign(v) v^2 for
alpha = 1/2, which is t / |t|_1 for the rotated vector t) and bounds the difference there by
1e-6 (measured: 2e-7 at most), and the vectors themselves by sqrt(1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoder import synthetic_maps

from selret.encoding.batched import encode_local, select
from selret.encoding.encoder import Encoder, EncoderConfig
from selret.encoding.masks import compute_mask
from selret.encoding.postprocessing import COMPLETION_NOISE, drop_start

pytestmark = pytest.mark.filterwarnings("ignore::selret.encoding.encoder.SmallLearningSetWarning")


def reference_encode(enc: Encoder, fmap) -> np.ndarray:
    """The final vector of one map, stage by stage in float64 (SPEC 2-6)."""
    c, pca, emb, rot = enc.config, enc.pca_, enc.embedder_, enc.rotation_
    f64 = np.float64
    x = fmap.local_features(compute_mask(c.mask, fmap)).astype(f64)  # SPEC 2
    z = (x - pca.mean_) @ pca.components_.astype(f64)  # SPEC 3
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    if emb.kind == "temb":  # SPEC 4
        r = z[:, None, :] - emb.codebook_.astype(f64)[None]
        phi = (r / np.linalg.norm(r, axis=2, keepdims=True)).reshape(len(z), -1)
    else:
        phi = np.asarray(emb.embed(z), f64)
    if emb.whitens:
        w = emb.whitener_
        phi = (phi - w.mean_) @ w.projection_.astype(f64)
        if emb.normalize_after_whitening:
            phi /= np.linalg.norm(phi, axis=1, keepdims=True)
    if c.aggregation == "democratic":  # SPEC 5
        gram = np.maximum(phi @ phi.T, 0)
        lam = np.ones(len(phi))
        for _ in range(c.democratic_iters):
            s = gram.sum(1)
            delta = np.where(s > 0, np.where(s > 0, s, 1) ** -c.democratic_gamma, 0)
            gram = delta[:, None] * gram * delta[None, :]
            lam *= delta
        psi = lam @ phi
    else:
        psi = phi.sum(0) if c.aggregation == "sum" else phi.mean(0)
    t = psi / np.linalg.norm(psi)  # SPEC 6
    if rot is not None:
        t = (t - rot.mean_) @ rot.P_.astype(f64) * rot.scale_
        learned = rot.n_components_
        start = min(c.effective_drop, max(0, learned - c.effective_drop))
        t = t[start : start + c.dim]
        completion = t[max(learned - start, 0) :]  # a view: zeroed in place
        if completion.size and np.linalg.norm(completion) <= 1e-3 * rot.scale_[learned]:
            completion[:] = 0
    t = np.sign(t) * np.abs(t) ** c.alpha
    return t / np.linalg.norm(t)


def unpowered(v: np.ndarray, alpha: float) -> np.ndarray:
    """sign(v) |v|^(1/alpha): the rotated vector t / |t|_(1/alpha)^(1/alpha), Lipschitz in t."""
    return np.sign(v) * np.abs(v.astype(np.float64)) ** (1 / alpha)


def assert_same_vectors(a, b, alpha, atol=1e-6):
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(unpowered(a, alpha), unpowered(b, alpha), rtol=0, atol=atol)
    # and the vectors themselves, within the power law's worst case sqrt(atol)
    np.testing.assert_allclose(a, b, rtol=0, atol=np.sqrt(atol) if alpha != 1 else atol)


CONFIGS = {
    "temb-demo max": dict(mask="max", embedding="temb", d=16, k=10, drop=8),
    "temb-demo sum": dict(mask="sum", embedding="temb", d=16, k=10, drop=8),
    "temb-demo sift": dict(mask="sift", embedding="temb", d=16, k=10, drop=8),
    "temb-demo none alpha 1": dict(mask="none", embedding="temb", d=16, k=10, drop=8, alpha=1.0),
    "temb-demo whitening": dict(mask="max", embedding="temb", d=16, k=10, rotation="whitening"),
    "temb no rotation": dict(mask="max", embedding="temb", d=8, k=6, rotation="none"),
    "temb sum": dict(mask="max", embedding="temb", aggregation="sum", d=8, k=6, drop=4),
    "vlad sum": dict(mask="max", embedding="vlad", aggregation="sum", d=8, k=4),
    "fv average": dict(mask="max", embedding="fv", aggregation="average", d=8, k=4),
    "faemb demo": dict(mask="max", embedding="faemb", d=4, k=10),
}


@pytest.fixture(scope="module")
def learn_maps():
    return synthetic_maps(40, seed=11)


@pytest.fixture(scope="module")
def test_maps():
    return synthetic_maps(6, seed=12)


@pytest.fixture(scope="module")
def fitted(learn_maps):
    out = {}
    for name, fields in CONFIGS.items():
        out[name] = Encoder(EncoderConfig(kmeans_iters=10, kmeans_restarts=1, **fields))
        out[name].fit(learn_maps)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_matches_the_float64_reference(name, fitted, test_maps, learn_maps):
    enc = fitted[name]
    for maps in (test_maps, learn_maps[:4]):
        ref = np.stack([reference_encode(enc, f) for f in maps])
        assert_same_vectors(enc.encode_many(maps), ref, enc.config.alpha)
        assert_same_vectors(enc.encode(maps[0]), ref[0], enc.config.alpha)


def test_encode_many_matches_encode_and_every_image_finds_itself(fitted, test_maps, learn_maps):
    enc = fitted["temb-demo max"]
    maps = test_maps + learn_maps
    many = enc.encode_many(maps)
    single = np.stack([enc.encode(f) for f in maps])
    assert many.dtype == np.float32 and many.shape == (len(maps), enc.dim)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1, atol=1e-6)
    assert_same_vectors(many, single, enc.config.alpha)
    assert (np.argmax(single @ many.T, axis=1) == np.arange(len(maps))).all()
    # small batches, a small element budget, and batches on worker threads change nothing
    # beyond rounding, nor the order
    chunked = enc.encode_many(maps, batch_size=3, max_elements=5000)
    assert_same_vectors(chunked, many, enc.config.alpha)
    # one map per batch: the very computation of encode(), bit for bit
    np.testing.assert_array_equal(enc.encode_many(maps, batch_size=1), single)
    kept: list[float] = []
    threaded = enc.encode_many(maps, batch_size=2, workers=3, kept=kept)
    assert_same_vectors(threaded, many, enc.config.alpha)
    assert kept == [float(compute_mask("max", f).mean()) for f in maps]


def test_learning_images_of_a_tiny_learning_set_find_themselves():
    # 8 learning images, drop 128 of 160 dimensions: the paper's rule would keep only completion
    # directions, where a learning image holds nothing but rounding noise. The drop now starts
    # at max(0, r - drop) = 0, and the noise is zeroed, so batched, single and torch encodes of
    # the same images agree and each finds itself.
    maps = synthetic_maps(8, seed=21)
    enc = Encoder(EncoderConfig(embedding="temb", d=16, k=10, kmeans_iters=5)).fit(maps)
    rotation = enc.rotation_
    assert rotation.n_components_ == 7 and enc.config.effective_drop == 128
    assert drop_start(rotation.n_components_, 128) == 0
    many = enc.encode_many(maps)
    single = np.stack([enc.encode(f) for f in maps])
    on_torch = enc.encode_many(maps, device="cpu")
    for other in (single, on_torch):
        assert_same_vectors(many, other, enc.config.alpha)
        assert (np.argmax(other @ many.T, axis=1) == np.arange(len(maps))).all()
    # a learning image lies in the learned span: nothing on the completion directions
    assert np.abs(many[:, rotation.n_components_ :]).max() == 0
    # an image outside the learning set keeps its completion components (SPEC 6)
    new = enc.encode(synthetic_maps(1, seed=22)[0])
    completion = new[rotation.n_components_ :]
    assert np.linalg.norm(completion) > 100 * COMPLETION_NOISE


def test_drop_start_is_the_papers_drop_once_enough_directions_are_learned():
    assert drop_start(1170, 128) == 128  # landmarks-learn at 4096-D
    assert drop_start(256, 128) == 128
    assert drop_start(200, 128) == 72  # keeps 128 learned directions
    assert drop_start(128, 128) == 0
    assert drop_start(7, 128) == 0
    assert drop_start(5, 0) == 0
    with pytest.raises(ValueError, match=">= 0"):
        drop_start(5, -1)


@pytest.mark.parametrize("name", ["temb-demo max", "temb sum", "fv average", "faemb demo"])
def test_torch_path_on_the_cpu_matches_numpy(name, fitted, test_maps):
    enc = fitted[name]
    assert_same_vectors(
        enc.encode_many(test_maps, device="cpu"), enc.encode_many(test_maps), enc.config.alpha
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_path_matches_numpy(fitted, test_maps, learn_maps):
    enc = fitted["temb-demo max"]
    maps = test_maps + learn_maps
    on_gpu = enc.encode_many(maps, device="cuda")
    assert_same_vectors(on_gpu, enc.encode_many(maps), enc.config.alpha)
    single = np.stack([enc.encode(f) for f in maps])
    assert (np.argmax(single @ on_gpu.T, axis=1) == np.arange(len(maps))).all()


def test_encode_local_takes_the_selected_columns(fitted, test_maps):
    enc = fitted["temb-demo max"]
    plan = enc._plan()
    columns = [select(plan, f) for f in test_maps]
    for f, col in zip(test_maps, columns, strict=True):
        np.testing.assert_array_equal(col.T, f.local_features(compute_mask("max", f)))
    np.testing.assert_array_equal(encode_local(plan, columns), enc.encode_many(test_maps))


def test_bad_maps_are_clear_errors(fitted, test_maps):
    enc = fitted["temb-demo max"]
    assert enc.encode_many([]).shape == (0, enc.dim)
    wrong = synthetic_maps(1, seed=3, shape=(32, 8, 10))[0]
    with pytest.raises(ValueError, match="32 channels.*expects 64"):
        enc.encode(wrong)
    sift = fitted["temb-demo sift"]
    no_keypoints = type(test_maps[0])(test_maps[0].features, test_maps[0].image_size)
    with pytest.raises(ValueError, match="SIFT-mask needs the map's SIFT keypoints"):
        sift.encode_many([no_keypoints])


def test_the_plan_follows_the_learned_state(fitted, learn_maps, test_maps):
    enc = Encoder(EncoderConfig(embedding="temb", d=16, k=10, drop=8, kmeans_iters=5))
    enc.fit(learn_maps)
    before = enc.encode_many(test_maps)
    enc.fit(learn_maps[:30])  # new learned objects: the cached plan must not be reused
    after = enc.encode_many(test_maps)
    ref = np.stack([reference_encode(enc, f) for f in test_maps])
    assert_same_vectors(after, ref, enc.config.alpha)
    assert not np.allclose(before, after)
