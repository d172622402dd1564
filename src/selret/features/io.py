"""Image input: file or bytes -> H x W x 3 uint8 RGB, and the network-input protocol of SPEC section 1.

``load_image`` decodes with Pillow (JPEG, PNG, WebP, TIFF and whatever else Pillow reads), applies the
EXIF orientation and converts every colour mode to RGB. Bad input raises a typed
:class:`~selret.errors.ImageError` naming the file and the reason; nothing is silently repaired
(truncated files are errors, not grey-padded images).

``prepare_image`` produces what the backbone sees: optional rotation (Holidays), optional query crop,
and the resize that makes the longest side of the *full* image exactly ``max_side``.
"""

from __future__ import annotations

import io as _io
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from selret.errors import (
    BoundingBoxError,
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageTooSmallError,
)

__all__ = [
    "image_size",
    "parse_bbox",
    "DEFAULT_MAX_PIXELS",
    "MIN_IMAGE_SIDE",
    "MIN_NETWORK_SIDE",
    "PreparedImage",
    "load_image",
    "prepare_image",
    "resize_longest",
    "resize_to",
    "rotate",
]

#: Default cap on width * height, checked from the header before decoding (decompression-bomb guard).
#: 64 MP is 8000 x 8000 and stays below Pillow's own warning threshold (about 89 MP).
DEFAULT_MAX_PIXELS = 64_000_000

#: Smallest accepted side of a decoded image. Smaller images (icons, 1 x 1 tracking pixels) carry no
#: retrievable content even though up-scaling could feed them to the network.
MIN_IMAGE_SIDE = 16

#: Smallest side of a prepared (resized or cropped) image: VGG16 halves the resolution five times
#: before pool5, so fewer than 32 px leave an empty feature grid.
MIN_NETWORK_SIDE = 32

# Modes Pillow converts to RGB directly and correctly (no alpha, 8 bits per channel).
_DIRECT_MODES = frozenset({"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
# Modes with an alpha channel: composited onto white so transparent areas do not turn black.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _source_name(source: str | Path | bytes, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(source)


def _open_bytes(source: str | Path | bytes, label: str) -> _io.BytesIO | Path:
    """Validate that ``source`` is a non-empty regular file (or non-empty bytes) and return it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyImageError(label, "zero bytes")
        return _io.BytesIO(bytes(source))
    path = Path(source)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageNotFoundError(label, "no such file") from None
    except OSError as exc:
        raise ImageNotFoundError(label, f"cannot access file: {exc.strerror or exc}") from None
    if path.is_dir():
        raise ImageNotFoundError(label, "is a directory, not an image file")
    if not path.is_file():
        raise ImageNotFoundError(label, "not a regular file")
    if st.st_size == 0:
        raise EmptyImageError(label, "zero bytes")
    return path


def _to_rgb(img: Image.Image) -> np.ndarray:
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
        grey = _high_depth_to_uint8(np.asarray(img), mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    # Anything else Pillow can still convert (e.g. rare raw modes); fails loudly otherwise.
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """One-channel 16/32-bit or float pixels -> uint8.

    16-bit data (``I;16*``, or ``I`` holding values up to 65535, as 16-bit PNGs may decode) is scaled
    by 255/65535 so that full white stays white. ``I`` within 0..255 is kept. Float data within 0..1
    is scaled by 255. Anything else is stretched linearly from its minimum to its maximum.
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


def load_image(
    source: str | Path | bytes,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> np.ndarray:
    """Decode an image file or bytes to an H x W x 3 uint8 RGB array, upright per its EXIF tag.

    ``name`` labels ``source`` in error messages (useful for bytes). ``max_pixels`` (None: no cap
    beyond Pillow's own) bounds width * height, checked from the header before any pixel is decoded.
    ``min_side`` is the smallest accepted height or width.

    Raises ImageNotFoundError (missing, a directory), EmptyImageError (zero bytes),
    CorruptImageError (not an image, truncated, undecodable), ImageTooLargeError (more than
    ``max_pixels`` pixels, or a Pillow decompression bomb), ImageTooSmallError (a side below
    ``min_side``).
    """
    label = _source_name(source, name)
    fp = _open_bytes(source, label)
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(label, f"decompression bomb refused by Pillow ({exc})") from None
    except UnidentifiedImageError:
        raise CorruptImageError(label, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(label, f"unreadable image header: {exc}") from None
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                label,
                f"{width} x {height} = {width * height} pixels exceeds the limit of {max_pixels}",
            )
        if min(width, height) < min_side:
            raise ImageTooSmallError(
                label, f"{width} x {height} px; each side must be >= {min_side} px"
            )
        try:
            # Force the full decode now: Pillow is lazy, and truncated data only fails here.
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb = _to_rgb(upright)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(
                label, f"decompression bomb refused by Pillow ({exc})"
            ) from None
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError) as exc:
            raise CorruptImageError(label, f"cannot decode ({_mode_name(img)}): {exc}") from None
    return np.ascontiguousarray(rgb)


def image_size(source: str | Path | bytes, name: str | None = None) -> tuple[int, int]:
    """(height, width) of an image as :func:`load_image` would return it (EXIF orientation
    applied), read from the header alone. Raises the same typed errors for unreadable files."""
    label = _source_name(source, name)
    try:
        with Image.open(_open_bytes(source, label)) as img:
            width, height = img.size
            # EXIF orientations 5-8 are transposed (rotated by 90 degrees): swap the sides.
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(label, f"unreadable image header: {exc}") from None
    return height, width


def _mode_name(img: Image.Image) -> str:
    """``FORMAT mode`` of a Pillow image, for error messages."""
    return f"{img.format or 'unknown format'} {img.mode}"


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def resize_to(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to exactly ``height`` x ``width``: area averaging to shrink, bicubic to enlarge."""
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    shrinking = height * width < h * w
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(rgb, (width, height), interpolation=interpolation)


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, _round_half_up(height * scale)), max(1, _round_half_up(width * scale))


def resize_longest(rgb: np.ndarray, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """Resize so that the longest side is exactly ``max_side`` (up or down), keeping the aspect.

    Returns the resized image (``rgb`` itself when already at size) and the scale factor
    ``max_side / longest side``. The shorter side is rounded half up.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    nh, nw = _scaled_size(h, w, scale)
    # Pin the longest side to max_side exactly, whatever the float rounding did.
    if h >= w:
        nh = max_side
    else:
        nw = max_side
    return resize_to(rgb, nh, nw), scale


def rotate(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate by ``rotation`` degrees counter-clockwise (a multiple of 90, negative = clockwise)."""
    if isinstance(rotation, bool) or not isinstance(rotation, numbers.Integral) or rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation!r}")
    k = (int(rotation) // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


@dataclass
class PreparedImage:
    """A network-input image and how it was derived from the file.

    ``rgb`` is H x W x 3 uint8. ``scale`` maps original (rotated) pixels to ``rgb`` pixels: the
    factor that brings the full image's longest side to ``max_side``. ``original_size`` is the
    (height, width) of the decoded image after rotation, before any crop. ``bbox`` is the crop
    actually applied, [x1, y1, x2, y2] in integer original pixels (x2, y2 exclusive), or None.
    """

    rgb: np.ndarray
    scale: float
    original_size: tuple[int, int]
    bbox: tuple[int, int, int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of ``rgb``."""
        return self.rgb.shape[0], self.rgb.shape[1]


def parse_bbox(text: str | None) -> list[float] | None:
    """``"x1,y1,x2,y2"`` (original-image pixels) -> four floats; None or blank -> None.

    Only the syntax is checked here; order, finiteness and overlap with the image are checked by
    :mod:`selret.features.io` once the image size is known. Raises BoundingBoxError.
    """
    if text is None or not text.strip():
        return None
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise BoundingBoxError(
            "bbox", f"{text[:100]!r} is not four comma-separated numbers x1,y1,x2,y2"
        )
    return values


def _validate_bbox(
    bbox: Sequence[float], height: int, width: int, label: str
) -> tuple[int, int, int, int]:
    """Integer pixel box [x1, y1, x2, y2) covering every pixel the float box touches, clipped."""
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise BoundingBoxError(
            label, f"bbox must be 4 numbers [x1, y1, x2, y2], got {bbox!r}"
        ) from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise BoundingBoxError(
            label, f"bbox must be 4 finite numbers [x1, y1, x2, y2], got {bbox!r}"
        )
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise BoundingBoxError(label, f"bbox {values} needs x2 > x1 and y2 > y1")
    # Floor/ceil: a pixel partly covered by the box belongs to the crop.
    ix1, iy1 = max(0, math.floor(x1)), max(0, math.floor(y1))
    ix2, iy2 = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    if ix2 <= ix1 or iy2 <= iy1:
        raise BoundingBoxError(label, f"bbox {values} lies outside the {width} x {height} image")
    return ix1, iy1, ix2, iy2


def prepare_image(
    source: str | Path | bytes,
    max_side: int = 1024,
    bbox: Sequence[float] | None = None,
    rotation: int = 0,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_NETWORK_SIDE,
) -> PreparedImage:
    """Load ``source`` and produce the network-input image of SPEC section 1.

    1. Rotate by ``rotation`` degrees counter-clockwise (multiples of 90; Holidays' mis-oriented
       images).
    2. ``scale = max_side / longest side`` of the full (rotated) image.
    3. Without ``bbox``: resize the image so its longest side is exactly ``max_side``.
       With ``bbox`` = [x1, y1, x2, y2] in pixels of the (rotated) original image: crop it (clipped
       to the image) and resize the crop by the same ``scale``, *not* to ``max_side``.

    Raises the errors of :func:`load_image`, BoundingBoxError for a malformed or empty box, and
    ImageTooSmallError when the result has a side below ``min_side`` (too little for pool5).
    """
    label = _source_name(source, name)
    rgb = rotate(load_image(source, name=label, max_pixels=max_pixels), rotation)
    height, width = rgb.shape[:2]
    if bbox is None:
        out, scale = resize_longest(rgb, max_side)
        used = None
    else:
        scale = max_side / max(height, width)
        used = _validate_bbox(bbox, height, width, label)
        x1, y1, x2, y2 = used
        crop = rgb[y1:y2, x1:x2]
        out = resize_to(crop, *_scaled_size(y2 - y1, x2 - x1, scale))
    if min(out.shape[:2]) < min_side:
        what = "crop" if bbox is not None else "image"
        raise ImageTooSmallError(
            label,
            f"{what} becomes {out.shape[1]} x {out.shape[0]} px at max_side={max_side}; "
            f"the network needs each side >= {min_side} px",
        )
    return PreparedImage(np.ascontiguousarray(out), float(scale), (height, width), used)
