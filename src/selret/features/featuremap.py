"""The record every stage after the backbone consumes: one image's conv map plus what the masks need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureMap:
    """Conv feature map of one image.

    ``features`` is (K, H, W) float32: K channels on an H x W grid; each grid cell is a K-dim local
    feature. ``image_size`` is the (height, width) of the network-input image, needed to map SIFT
    keypoints onto the grid. ``keypoints`` are (N, 2) float32 (x, y) SIFT keypoint positions in
    network-input pixels, stored with the map so that the SIFT-mask needs no image; None when they
    were never computed (an empty array means "computed, none found").
    """

    features: np.ndarray
    image_size: tuple[int, int]
    keypoints: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 3:
            raise ValueError(f"features must be (K, H, W), got shape {self.features.shape}")
        if self.keypoints is not None:
            self.keypoints = np.asarray(self.keypoints, dtype=np.float32).reshape(-1, 2)
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    @property
    def channels(self) -> int:
        return self.features.shape[0]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(H, W) of the feature grid."""
        return self.features.shape[1], self.features.shape[2]

    def local_features(self, mask: np.ndarray | None = None) -> np.ndarray:
        """(n, K) local features, row-major over the grid, optionally only where ``mask`` is True."""
        flat = self.features.reshape(self.channels, -1).T
        if mask is None:
            return np.ascontiguousarray(flat)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.grid_shape:
            raise ValueError(f"mask shape {mask.shape} != grid shape {self.grid_shape}")
        return np.ascontiguousarray(flat[mask.reshape(-1)])
