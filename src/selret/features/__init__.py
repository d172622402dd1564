"""Stage 1, images -> conv feature maps: image io, the VGG16 backbone, SIFT keypoints, extraction
and the on-disk feature cache. Imports nothing from the later stages."""

from selret.features.featuremap import FeatureMap

__all__ = ["FeatureMap"]
