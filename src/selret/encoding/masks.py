"""Selection masks over the conv grid (SPEC section 2): which local features an image keeps.

Every mask is a boolean (H, W) array over the feature grid of one image; True means "keep the local
feature at this cell". ``compute_mask(kind, fmap)`` dispatches on the mask name.
"""

from __future__ import annotations

import numpy as np

from selret.features import FeatureMap

MASKS: tuple[str, ...] = ("sift", "sum", "max", "none")


def _check_features(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features must be (K, H, W), got shape {features.shape}")
    if 0 in features.shape:
        raise ValueError(f"features must be non-empty, got shape {features.shape}")
    return features


def _round_half_up(x: np.ndarray) -> np.ndarray:
    # MATLAB's round (the reference code's) sends halves up for the non-negative values here;
    # np.round would send them to the even neighbour.
    return np.floor(x + 0.5).astype(np.int64)


def sift_mask(
    keypoints: np.ndarray, image_size: tuple[int, int], grid_shape: tuple[int, int]
) -> np.ndarray:
    """SIFT-mask: the grid cells under a SIFT keypoint, dilated to their 3x3 neighbourhood.

    ``keypoints`` are (N, 2) (x, y) positions in the pixels of an image of ``image_size`` =
    (height, width); ``grid_shape`` = (H, W) is the conv grid. Keypoint (x, y) falls on cell
    (row, col) = (round(y * H / height), round(x * W / width)), clamped into the grid. An image
    without keypoints keeps every cell.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 2 or keypoints.shape[1] != 2:
        if keypoints.size != 0:
            raise ValueError(f"keypoints must be (N, 2) (x, y), got shape {keypoints.shape}")
        keypoints = keypoints.reshape(0, 2)
    height, width = (int(v) for v in image_size)
    rows, cols = (int(v) for v in grid_shape)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive (height, width), got {image_size}")
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid_shape must be positive (H, W), got {grid_shape}")
    if not np.isfinite(keypoints).all():
        raise ValueError("keypoints contain NaN or infinite coordinates")

    mask = np.zeros((rows, cols), dtype=bool)
    if len(keypoints) == 0:
        mask[:] = True
        return mask
    col = np.clip(_round_half_up(keypoints[:, 0] * cols / width), 0, cols - 1)
    row = np.clip(_round_half_up(keypoints[:, 1] * rows / height), 0, rows - 1)
    # 3x3 dilation; clamping a neighbour outside the grid lands on a border cell that is already
    # in the neighbourhood, so it adds nothing spurious.
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            mask[np.clip(row + dr, 0, rows - 1), np.clip(col + dc, 0, cols - 1)] = True
    return mask


def sum_mask(features: np.ndarray) -> np.ndarray:
    """SUM-mask of a (K, H, W) map: cells whose channel sum is >= the median of the channel sums.

    With an even number of cells the median is the mean of the two middle sums (as MATLAB's).
    """
    total = _check_features(features).sum(axis=0, dtype=np.float64)
    return total >= np.median(total)


def max_mask(features: np.ndarray) -> np.ndarray:
    """MAX-mask of a (K, H, W) map: union over channels of the cell holding the channel's maximum.

    Ties go to the first cell in row-major order, so an all-zero channel picks cell (0, 0), as in
    the reference code.
    """
    features = _check_features(features)
    k, h, w = features.shape
    mask = np.zeros(h * w, dtype=bool)
    mask[features.reshape(k, h * w).argmax(axis=1)] = True
    return mask.reshape(h, w)


def none_mask(features: np.ndarray) -> np.ndarray:
    """No selection: every cell of the (K, H, W) map is kept."""
    features = _check_features(features)
    return np.ones(features.shape[1:], dtype=bool)


def compute_mask(kind: str, fmap: FeatureMap) -> np.ndarray:
    """The (H, W) bool mask named ``kind`` (one of ``MASKS``) of one image's feature map."""
    if kind == "sift":
        if fmap.keypoints is None:
            # Keeping every cell here would silently turn the SIFT-mask into no mask at all.
            raise ValueError(
                "the SIFT-mask needs the map's SIFT keypoints, which were never computed for it "
                "(extract it with keypoints, e.g. through selret.features.extractor.Extractor)"
            )
        return sift_mask(fmap.keypoints, fmap.image_size, fmap.grid_shape)
    if kind == "sum":
        return sum_mask(fmap.features)
    if kind == "max":
        return max_mask(fmap.features)
    if kind == "none":
        return none_mask(fmap.features)
    raise ValueError(f"unknown mask {kind!r}; valid masks: {', '.join(MASKS)}")


def kept_fraction(mask: np.ndarray) -> float:
    """Fraction of grid cells a mask keeps (1 - the fraction of features removed)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        raise ValueError("kept_fraction of an empty mask")
    return float(mask.mean())
