"""Pillow images of any colour mode -> H x W x 3 uint8 RGB, the one pixel format the network takes.

Used by :mod:`selret.features.io`; alpha is composited onto white, palettes expanded, 16-bit and
float data scaled to 8 bits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["high_depth_to_uint8", "to_rgb"]

# Modes Pillow converts to RGB directly and correctly (no alpha, 8 bits per channel).
_DIRECT_MODES = frozenset({"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
# Modes with an alpha channel: composited onto white so transparent areas do not turn black.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> H x W x 3 uint8 RGB (alpha on white, high bit depths scaled to 8 bits)."""
    mode = img.mode
    if mode == "P":
        # A palette with a transparent index becomes RGBA first, then goes the alpha path.
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
    if mode in _DIRECT_MODES:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = high_depth_to_uint8(np.asarray(img), mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    # Anything else Pillow can still convert (e.g. rare raw modes); fails loudly otherwise.
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """One-channel 16/32-bit or float pixels -> uint8.

    16-bit data (``I;16*``, or ``I`` holding values up to 65535, as 16-bit PNGs may decode) is scaled
    by 255/65535 so that full white stays white. ``I`` within 0..255 is kept. Float data within 0..1
    is scaled by 255. Anything else is stretched linearly from its minimum to its maximum.
    Non-finite values (refused unless ``strict=False``, see :func:`selret.features.integrity.nonfinite_damage`) become 0.
    """
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi > 255 and hi <= 65535):
        a = a * (255.0 / 65535.0)
    elif mode == "I" and lo >= 0 and hi <= 255:
        pass
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))
    else:
        a = np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
