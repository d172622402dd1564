from pathlib import Path

import cv2
import numpy as np
import pytest

from selret.encoding.masks import (
    MASKS,
    compute_mask,
    kept_fraction,
    max_mask,
    none_mask,
    sift_mask,
    sum_mask,
)
from selret.features import FeatureMap
from selret.features.keypoints import detect_keypoints

PARIS = Path("/work/shared/data/paris6k-250/jpg")


# ---------------------------------------------------------------- SUM-mask


def test_sum_mask_even_count_median_is_mean_of_middle_pair():
    # Channel sums per cell: [[1, 2], [3, 10]] -> median (2 + 3) / 2 = 2.5.
    features = np.array([[[1, 1], [2, 4]], [[0, 1], [1, 6]]], np.float32)
    expected = np.array([[False, False], [True, True]])
    np.testing.assert_array_equal(sum_mask(features), expected)


def test_sum_mask_odd_count_keeps_median_cell():
    features = np.array([[[5, 1, 3]]], np.float32)  # sums 5, 1, 3; median 3
    np.testing.assert_array_equal(sum_mask(features), [[True, False, True]])


def test_sum_mask_ties_and_constant_map_keep_everything():
    np.testing.assert_array_equal(sum_mask(np.zeros((4, 2, 3), np.float32)), np.ones((2, 3), bool))
    # Sums [2, 2, 2, 7]: median 2, all ties at the median are kept.
    features = np.array([[[2, 2], [2, 7]]], np.float32)
    np.testing.assert_array_equal(sum_mask(features), np.ones((2, 2), bool))


# ---------------------------------------------------------------- MAX-mask


def test_max_mask_union_of_channel_argmax():
    features = np.zeros((3, 2, 3), np.float32)
    features[0, 1, 2] = 5.0
    features[1, 0, 1] = 2.0
    features[2, 0, 1] = 9.0  # same cell as channel 1: the union has two cells
    expected = np.zeros((2, 3), bool)
    expected[1, 2] = expected[0, 1] = True
    np.testing.assert_array_equal(max_mask(features), expected)


def test_max_mask_ties_pick_first_row_major_and_zero_channel_picks_origin():
    features = np.zeros((2, 3, 3), np.float32)
    features[0, 2, 0] = 4.0
    features[0, 1, 2] = 4.0  # tie with (2, 0): (1, 2) comes first in row-major order
    # channel 1 stays all zero -> cell (0, 0)
    expected = np.zeros((3, 3), bool)
    expected[1, 2] = expected[0, 0] = True
    np.testing.assert_array_equal(max_mask(features), expected)


def test_max_mask_negative_values():
    features = -np.arange(6, dtype=np.float32).reshape(1, 2, 3) - 1.0
    expected = np.zeros((2, 3), bool)
    expected[0, 0] = True
    np.testing.assert_array_equal(max_mask(features), expected)


# ---------------------------------------------------------------- SIFT-mask


def test_sift_mask_rounding_and_dilation_interior():
    # 64 x 64 image on an 8 x 8 grid: x * 8 / 64 = x / 8.
    kp = np.array([[20.0, 28.0]])  # col round(2.5) = 3 (half up), row round(3.5) = 4
    mask = sift_mask(kp, (64, 64), (8, 8))
    expected = np.zeros((8, 8), bool)
    expected[3:6, 2:5] = True
    np.testing.assert_array_equal(mask, expected)


def test_sift_mask_clamps_at_borders():
    # Image 40 high x 100 wide, grid 4 x 5. (99, 39) -> col round(4.95)=5 -> 4, row round(3.9)=4 -> 3.
    # (0, 0) -> cell (0, 0); (-3, 50) is off the image -> col 0, row round(5) = 5 -> 3.
    kp = np.array([[99.0, 39.0], [0.0, 0.0]])
    expected = np.zeros((4, 5), bool)
    expected[2:4, 3:5] = True
    expected[0:2, 0:2] = True
    np.testing.assert_array_equal(sift_mask(kp, (40, 100), (4, 5)), expected)

    expected_off = np.zeros((4, 5), bool)
    expected_off[2:4, 0:2] = True
    np.testing.assert_array_equal(
        sift_mask(np.array([[-3.0, 50.0]]), (40, 100), (4, 5)), expected_off
    )


def test_sift_mask_uses_height_and_width_separately():
    # Image height 10, width 100, grid 2 x 10: x scale 0.1, y scale 0.2.
    kp = np.array([[0.0, 7.0]])  # row round(1.4) = 1, col 0
    expected = np.zeros((2, 10), bool)
    expected[0:2, 0:2] = True
    np.testing.assert_array_equal(sift_mask(kp, (10, 100), (2, 10)), expected)
    kp = np.array([[95.0, 0.0]])  # col round(9.5) = 10 -> 9, row 0
    expected = np.zeros((2, 10), bool)
    expected[0:2, 8:10] = True
    np.testing.assert_array_equal(sift_mask(kp, (10, 100), (2, 10)), expected)


def test_sift_mask_without_keypoints_keeps_everything():
    np.testing.assert_array_equal(
        sift_mask(np.zeros((0, 2)), (64, 48), (2, 3)), np.ones((2, 3), bool)
    )
    np.testing.assert_array_equal(sift_mask(np.zeros(0), (64, 48), (2, 3)), np.ones((2, 3), bool))


def test_sift_mask_bad_input():
    with pytest.raises(ValueError, match="keypoints"):
        sift_mask(np.zeros((3, 3)), (10, 10), (2, 2))
    with pytest.raises(ValueError, match="image_size"):
        sift_mask(np.zeros((1, 2)), (0, 10), (2, 2))
    with pytest.raises(ValueError, match="grid_shape"):
        sift_mask(np.zeros((1, 2)), (10, 10), (0, 2))
    with pytest.raises(ValueError, match="NaN"):
        sift_mask(np.array([[np.nan, 1.0]]), (10, 10), (2, 2))


# ---------------------------------------------------------------- dispatch


def test_compute_mask_dispatch_and_kept_fraction():
    rng = np.random.default_rng(0)
    features = rng.random((4, 3, 5)).astype(np.float32)
    fmap = FeatureMap(features, image_size=(96, 160), keypoints=np.array([[0.0, 0.0]]))
    np.testing.assert_array_equal(compute_mask("sum", fmap), sum_mask(features))
    np.testing.assert_array_equal(compute_mask("max", fmap), max_mask(features))
    np.testing.assert_array_equal(compute_mask("none", fmap), none_mask(features))
    sift = compute_mask("sift", fmap)
    np.testing.assert_array_equal(sift, sift_mask(fmap.keypoints, (96, 160), (3, 5)))
    assert kept_fraction(sift) == pytest.approx(4 / 15)
    assert kept_fraction(compute_mask("none", fmap)) == 1.0
    assert set(MASKS) == {"sift", "sum", "max", "none"}
    for kind in MASKS:
        mask = compute_mask(kind, fmap)
        assert mask.dtype == bool and mask.shape == (3, 5) and mask.any()


def test_compute_mask_unknown_kind_lists_valid_ones():
    fmap = FeatureMap(np.ones((1, 2, 2), np.float32), image_size=(64, 64))
    with pytest.raises(ValueError, match="sift, sum, max, none"):
        compute_mask("median", fmap)


def test_masks_reject_bad_feature_shapes():
    for fn in (sum_mask, max_mask, none_mask):
        with pytest.raises(ValueError, match="K, H, W"):
            fn(np.ones((3, 4)))
        with pytest.raises(ValueError, match="non-empty"):
            fn(np.ones((0, 2, 2)))
    with pytest.raises(ValueError, match="empty"):
        kept_fraction(np.zeros((0, 3), bool))


# ---------------------------------------------------------------- keypoint detection


def _textured_image(h=160, w=200, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 128, np.uint8)
    for _ in range(40):
        x, y = int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10))
        r = int(rng.integers(3, 9))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(img, (x, y), r, color, -1)
    return img


def test_detect_keypoints_textured_vs_flat():
    img = _textured_image()
    kp = detect_keypoints(img)
    assert kp.dtype == np.float32 and kp.ndim == 2 and kp.shape[1] == 2
    assert len(kp) >= 20
    assert (kp[:, 0] >= 0).all() and (kp[:, 0] <= img.shape[1] - 1).all()
    assert (kp[:, 1] >= 0).all() and (kp[:, 1] <= img.shape[0] - 1).all()
    flat = np.full((160, 200, 3), 90, np.uint8)
    assert detect_keypoints(flat).shape == (0, 2)
    # Greyscale input gives the same keypoints as its RGB copy.
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(detect_keypoints(grey), detect_keypoints(np.dstack([grey] * 3)))


def test_detect_keypoints_threshold_and_octave_parameters_select_subsets():
    img = _textured_image(seed=1)
    default = detect_keypoints(img)
    strict = detect_keypoints(img, contrast_threshold=0.2)
    no_upsampled = detect_keypoints(img, min_octave=0)
    assert len(strict) < len(default)
    assert 0 < len(no_upsampled) < len(default)
    # min_octave only filters: every kept position is one of the default ones.
    assert {tuple(p) for p in no_upsampled.tolist()} <= {tuple(p) for p in default.tolist()}


def test_detect_keypoints_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        detect_keypoints(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        detect_keypoints(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        detect_keypoints(np.zeros((0, 10), np.uint8))


@pytest.mark.skipif(not PARIS.is_dir(), reason="paris6k-250 data not available")
def test_detect_keypoints_on_real_images():
    paths = sorted(PARIS.glob("*/*.jpg"))[::100][:3]
    assert len(paths) == 3
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert bgr is not None, path
        h, w = bgr.shape[:2]
        scale = 1024 / max(h, w)
        rgb = cv2.cvtColor(
            cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR),
            cv2.COLOR_BGR2RGB,
        )
        kp = detect_keypoints(rgb)
        height, width = rgb.shape[:2]
        assert max(height, width) == 1024
        assert len(kp) > 300, (path, len(kp))
        assert (kp >= 0).all()
        assert (kp[:, 0] <= width - 1).all() and (kp[:, 1] <= height - 1).all()
        mask = sift_mask(kp, (height, width), (height // 32, width // 32))
        assert 0.2 < kept_fraction(mask) < 1.0


def test_sift_mask_without_computed_keypoints_is_an_error():
    fmap = FeatureMap(np.ones((4, 3, 3), np.float32), (96, 96))  # keypoints never computed
    with pytest.raises(ValueError, match="never computed"):
        compute_mask("sift", fmap)
    found_none = FeatureMap(np.ones((4, 3, 3), np.float32), (96, 96), np.zeros((0, 2)))
    assert compute_mask("sift", found_none).all()  # computed, none found: every cell (SPEC 2)
