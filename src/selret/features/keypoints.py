"""SIFT keypoints of a network-input image (SPEC section 2), stored with its conv map so that the
SIFT-mask can be computed later from the feature cache alone."""

from __future__ import annotations

import cv2
import numpy as np

# VLFeat (the reference detector) keeps an extremum when its interpolated DoG value satisfies
# |D| > peak_thresh, with D in the units of the input image (0..255 grey here); its pre-filter on
# the raw samples is 0.8 * peak_thresh. OpenCV's SIFT works on the same 0..255 float image
# (SIFT_FIXPT_SCALE = 1) but (sift.simd.hpp) pre-filters samples at
#     |D| > 0.5 * contrastThreshold / nOctaveLayers * 255
# and keeps an interpolated extremum when
#     |D| / 255 * nOctaveLayers >= contrastThreshold.
# Matching the final test to VLFeat's gives contrastThreshold = peak_thresh * nOctaveLayers / 255;
# with peak_thresh = 4 and 3 layers per octave that is 0.0471 (OpenCV's pre-filter is then at
# |D| > 2, looser than VLFeat's 3.2, so it removes nothing the final test would keep). Equating
# the pre-filter instead (0.0941) would double the effective threshold to |D| > 8.
# edgeThreshold has the same meaning in both libraries (ratio r of principal curvatures, test
# (r + 1)^2 / r), so VLFeat's edge_thresh = 10 carries over unchanged.
VLFEAT_PEAK_THRESHOLD = 4.0
SIFT_OCTAVE_LAYERS = 3
SIFT_CONTRAST_THRESHOLD = VLFEAT_PEAK_THRESHOLD * SIFT_OCTAVE_LAYERS / 255.0
SIFT_EDGE_THRESHOLD = 10.0


def detect_keypoints(
    rgb: np.ndarray,
    *,
    contrast_threshold: float = SIFT_CONTRAST_THRESHOLD,
    edge_threshold: float = SIFT_EDGE_THRESHOLD,
    n_octave_layers: int = SIFT_OCTAVE_LAYERS,
    min_octave: int = -1,
) -> np.ndarray:
    """(N, 2) float32 (x, y) positions of the SIFT keypoints of an image, in its pixels.

    ``rgb`` is the (already resized) network-input image, (H, W, 3) uint8 RGB or (H, W) uint8 grey;
    detection runs on its greyscale. The defaults approximate VLFeat's ``peak_thresh=4,
    edge_thresh=10`` (see the derivation above ``SIFT_CONTRAST_THRESHOLD``). OpenCV always starts
    at octave -1 (the image up-sampled 2x) while VLFeat's default first octave is 0;
    ``min_octave=0`` drops the keypoints found on the up-sampled octave to mimic that. The default
    keeps them: on 50 Paris6k images at 1024 px the SIFT-mask then keeps 60% of the pool5 cells
    (56% with ``min_octave=0``), the closer of the two to the paper's ~75%.
    Positions use OpenCV's convention: the centre of pixel (0, 0) is (0.0, 0.0).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ValueError(f"detect_keypoints needs a uint8 image, got dtype {rgb.dtype}")
    if rgb.ndim == 3 and rgb.shape[2] == 3:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif rgb.ndim == 2:
        grey = rgb
    else:
        raise ValueError(
            f"detect_keypoints needs an (H, W, 3) RGB or (H, W) image, got {rgb.shape}"
        )
    if grey.size == 0:
        raise ValueError(f"detect_keypoints got an empty image of shape {rgb.shape}")
    sift = cv2.SIFT_create(
        nfeatures=0,
        nOctaveLayers=int(n_octave_layers),
        contrastThreshold=float(contrast_threshold),
        edgeThreshold=float(edge_threshold),
    )
    keypoints = sift.detect(np.ascontiguousarray(grey), None)
    if not keypoints:
        return np.zeros((0, 2), np.float32)
    xy = cv2.KeyPoint_convert(keypoints).reshape(-1, 2).astype(np.float32)
    if min_octave > -1:
        # KeyPoint.octave packs the octave as a signed byte in its low 8 bits.
        packed = np.fromiter((k.octave for k in keypoints), np.int64, len(keypoints))
        octave = ((packed & 0xFF) ^ 0x80) - 0x80
        xy = xy[octave >= min_octave]
    return np.ascontiguousarray(xy)
