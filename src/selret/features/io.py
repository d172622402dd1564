"""Image input: file or bytes -> H x W x 3 uint8 RGB, and the network-input protocol of SPEC section 1.

``load_image`` decodes with Pillow (JPEG, PNG, WebP, TIFF, GIF, BMP and whatever else Pillow reads;
the first frame of animations and multi-page files), applies the EXIF orientation and converts every
colour mode to RGB. Bad input raises a typed :class:`~selret.errors.ImageError` naming the file and
the reason; nothing is silently repaired (truncated files are errors, not grey-padded images).

Images that *decode* but whose data is damaged (corrupt JPEG entropy data, trailing garbage after a
JPEG's end marker, NaN or infinite pixels in a float image) are refused with CorruptImageError by
default; ``strict=False`` accepts them with a logged warning (and ``PreparedImage.damage`` says why).

``draft_size`` / ``draft=True`` let a JPEG be decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself, as
long as that keeps the size the caller needs: memory then follows the network input, not the file.

``prepare_image`` produces what the backbone sees: optional rotation (Holidays), optional query crop,
and the resize that makes the longest side of the *full* image exactly ``max_side``.
"""

from __future__ import annotations

import io as _io
import logging
import math
import numbers
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
from selret.features.integrity import CHECKED_FORMATS, file_damage, nonfinite_damage
from selret.features.pixels import to_rgb
from selret.files import file_type_reason

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

logger = logging.getLogger(__name__)

#: Default cap on width * height, checked from the header before decoding (decompression-bomb guard).
#: 64 MP is 8000 x 8000 and stays below Pillow's own warning threshold (about 89 MP).
DEFAULT_MAX_PIXELS = 64_000_000

#: Smallest accepted side of a decoded image. Smaller images (icons, 1 x 1 tracking pixels) carry no
#: retrievable content even though up-scaling could feed them to the network.
MIN_IMAGE_SIDE = 16

#: Smallest side of a prepared (resized or cropped) image: VGG16 halves the resolution five times
#: before pool5, so fewer than 32 px leave an empty feature grid.
MIN_NETWORK_SIDE = 32

_EXIF_ORIENTATION = 0x0112

# selret enforces its own cap (max_pixels, checked right after the header is read), so Pillow's
# warning for images between its two limits would only repeat it, as a Python warning on stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# EXIF only gives selret the orientation; unreadable EXIF means "no orientation", as Pillow decides.
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)


def _source_name(source: str | Path | bytes, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(source)


@contextmanager
def _open_source(source: str | Path | bytes, label: str) -> Iterator[BinaryIO]:
    """``source`` as an open binary file: non-empty bytes, or a non-empty regular file.

    The file type is checked before opening, so a FIFO never blocks the reader.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyImageError(label, "zero bytes")
        yield _io.BytesIO(bytes(source))
        return
    path = Path(source)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageNotFoundError(
                label, f"broken symbolic link (to {os.readlink(path)})"
            ) from None
        raise ImageNotFoundError(label, "no such file") from None
    except OSError as exc:
        raise ImageNotFoundError(label, f"cannot access file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageNotFoundError(label, file_type_reason(st.st_mode))
    if st.st_size == 0:
        raise EmptyImageError(label, "zero bytes")
    try:
        fh = open(path, "rb")  # noqa: SIM115 -- closed below, after the caller is done
    except OSError as exc:
        raise ImageNotFoundError(label, f"cannot read file: {exc.strerror or exc}") from None
    with fh:
        yield fh


def _open_image(fh: BinaryIO, label: str) -> Image.Image:
    try:
        return Image.open(fh)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(label, f"decompression bomb refused by Pillow ({exc})") from None
    except UnidentifiedImageError:
        raise CorruptImageError(label, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(label, f"unreadable image header: {exc}") from None


def _transposed(img: Image.Image) -> bool:
    """Whether the EXIF orientation of ``img`` swaps its sides (orientations 5-8), from the header.

    For a PNG, ``getexif()`` decodes every pixel first (the eXIf chunk may follow the image data),
    which would undo the pixel cap checked after this; so a PNG's orientation is read only from an
    eXIf chunk that comes before the pixels (``img.info``), as a header read should.
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return False
            exif = Image.Exif()
            exif.load(raw)
            return exif.get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        return img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # unreadable EXIF: exif_transpose will ignore it the same way
        return False


def _draft_request(width: int, height: int, need_w: int, need_h: int) -> tuple[int, int] | None:
    """The size to ask ``Image.draft`` for so that libjpeg decodes a ``width`` x ``height`` JPEG at
    the largest reduction r (8, 4 or 2) whose result, ceil(side / r), still holds ``need_w`` x
    ``need_h``; None when no reduction does.

    Pillow picks r from ``side // requested`` (floor), which would refuse 1/2 for a 683-px side
    needed at 342 px although ceil(683 / 2) = 342; so the request is chosen to make Pillow's floor
    land on r exactly: at most side // r, and above side // (2 r) where a larger r is possible.
    """
    for r in (8, 4, 2):
        if -(-width // r) >= need_w and -(-height // r) >= need_h:
            lowest = (width // (2 * r) + 1, height // (2 * r) + 1) if r < 8 else (1, 1)
            return (
                max(lowest[0], min(need_w, width // r), 1),
                max(lowest[1], min(need_h, height // r), 1),
            )
    return None


@dataclass
class _Decoded:
    rgb: np.ndarray  # upright H x W x 3 uint8; smaller than ``size`` after a draft decode
    size: tuple[int, int]  # (height, width) of the full-resolution upright image, from the header
    damage: str | None  # why the data is damaged (accepted because strict=False), or None


def _check_pixels(label: str, width: int, height: int, decoded: tuple, max_pixels) -> None:
    """ImageTooLargeError when the ``decoded`` (w, h) size has more than ``max_pixels`` pixels."""
    pixels = decoded[0] * decoded[1]
    if max_pixels is not None and pixels > max_pixels:
        at = "" if decoded == (width, height) else f" (decoded at {decoded[0]} x {decoded[1]})"
        raise ImageTooLargeError(
            label, f"{width} x {height}{at} = {pixels} pixels exceeds the limit of {max_pixels}"
        )


def _decode(
    source: str | Path | bytes,
    label: str,
    max_pixels: int | None,
    min_side: int,
    draft: Callable[[int, int], tuple[int, int]] | None,
    strict: bool,
) -> _Decoded:
    """The one decoder behind :func:`load_image` and :func:`prepare_image`.

    ``draft(height, width)`` maps the upright full size to the (height, width) the caller needs at
    least; a JPEG is then decoded at the largest libjpeg reduction that keeps it.
    """
    with _open_source(source, label) as fh, _open_image(fh, label) as img:
        width, height = img.size
        # Checked before the EXIF read (a PNG's decodes every pixel); a JPEG under draft is
        # checked at its reduced size below instead, which needs the orientation first.
        reducible = draft is not None and img.format == "JPEG"
        if not reducible:
            _check_pixels(label, width, height, img.size, max_pixels)
        transposed = _transposed(img)
        size = (width, height) if transposed else (height, width)
        if draft is not None:
            need_h, need_w = draft(*size)
            if transposed:
                need_h, need_w = need_w, need_h
            request = _draft_request(width, height, need_w, need_h)
            if request is not None:
                # A no-op for formats without reduced decoding; for JPEG it changes img.size.
                img.draft(None, request)
        if reducible:
            _check_pixels(label, width, height, img.size, max_pixels)
        if min(width, height) < min_side:
            raise ImageTooSmallError(
                label, f"{width} x {height} px; each side must be >= {min_side} px"
            )
        try:
            # Force the full decode now: Pillow is lazy, and truncated data only fails here.
            img.load()
            upright = ImageOps.exif_transpose(img)
            damage = nonfinite_damage(upright)
            rgb = to_rgb(upright)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(
                label, f"decompression bomb refused by Pillow ({exc})"
            ) from None
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError) as exc:
            raise CorruptImageError(label, f"cannot decode ({_mode_name(img)}): {exc}") from None
        if damage is None and img.format in CHECKED_FORMATS:
            fh.seek(0)
            damage = file_damage(img.format, fh.read())
    if damage is not None:
        if strict:
            raise CorruptImageError(label, f"damaged image data: {damage}")
        logger.warning("%s: damaged image data accepted: %s", label, damage)
    return _Decoded(np.ascontiguousarray(rgb), size, damage)


def load_image(
    source: str | Path | bytes,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
    *,
    draft_size: tuple[int, int] | None = None,
    strict: bool = True,
) -> np.ndarray:
    """Decode an image file or bytes to an H x W x 3 uint8 RGB array, upright per its EXIF tag.

    ``name`` labels ``source`` in error messages (useful for bytes). ``max_pixels`` (None: no cap
    beyond Pillow's own) bounds the pixels decoded (width * height), checked from the header before
    any pixel is decoded. ``min_side`` is the smallest accepted height or width (of the file).

    ``draft_size`` = (height, width) of the upright image: a JPEG is decoded at 1/2, 1/4 or 1/8 of its
    size when each side stays >= these (libjpeg's DCT scaling: less memory and time); other formats,
    and None, decode in full. ``max_pixels`` then applies to the reduced size.

    ``strict`` (default): an image whose data is damaged although it decodes (corrupt JPEG data,
    trailing garbage after the JPEG end marker, NaN or infinite pixels) raises CorruptImageError.
    ``strict=False`` returns it with a logged warning (NaN / infinite pixels become 0).

    Raises ImageNotFoundError (missing, a directory, a FIFO, a broken link, unreadable),
    EmptyImageError (zero bytes), CorruptImageError (not an image, truncated, undecodable, damaged),
    ImageTooLargeError (more than ``max_pixels`` pixels, or a Pillow decompression bomb),
    ImageTooSmallError (a side below ``min_side``).
    """
    draft = None if draft_size is None else (lambda h, w: draft_size)
    return _decode(source, _source_name(source, name), max_pixels, min_side, draft, strict).rgb


def image_size(source: str | Path | bytes, name: str | None = None) -> tuple[int, int]:
    """(height, width) of an image as :func:`load_image` would return it (EXIF orientation
    applied), read from the header alone. Raises the same typed errors for unreadable files."""
    label = _source_name(source, name)
    with _open_source(source, label) as fh, _open_image(fh, label) as img:
        width, height = img.size
        # EXIF orientations 5-8 are transposed (rotated by 90 degrees): swap the sides.
        return (width, height) if _transposed(img) else (height, width)


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


def _longest_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) with the longest side exactly ``max_side``, the aspect kept (rounded half up)."""
    nh, nw = _scaled_size(height, width, max_side / max(height, width))
    # Pin the longest side to max_side exactly, whatever the float rounding did.
    return (max_side, nw) if height >= width else (nh, max_side)


def resize_longest(rgb: np.ndarray, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """Resize so that the longest side is exactly ``max_side`` (up or down), keeping the aspect.

    Returns the resized image (``rgb`` itself when already at size) and the scale factor
    ``max_side / longest side``. The shorter side is rounded half up.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    h, w = rgb.shape[:2]
    return resize_to(rgb, *_longest_size(h, w, max_side)), max_side / max(h, w)


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
    ``damage`` says why the file's data is damaged when it was accepted anyway (``strict=False``).
    """

    rgb: np.ndarray
    scale: float
    original_size: tuple[int, int]
    bbox: tuple[int, int, int, int] | None = None
    damage: str | None = None

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


def _needed_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The smallest decoded (height, width) from which the network input of a ``height`` x
    ``width`` image at ``max_side`` (or any crop of it, resized by the same scale) loses nothing."""
    scale = max_side / max(height, width)
    return math.ceil(height * scale), math.ceil(width * scale)


def prepare_image(
    source: str | Path | bytes,
    max_side: int = 1024,
    bbox: Sequence[float] | None = None,
    rotation: int = 0,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_NETWORK_SIDE,
    *,
    draft: bool = False,
    strict: bool = True,
) -> PreparedImage:
    """Load ``source`` and produce the network-input image of SPEC section 1.

    1. Rotate by ``rotation`` degrees counter-clockwise (multiples of 90; Holidays' mis-oriented
       images).
    2. ``scale = max_side / longest side`` of the full (rotated) image.
    3. Without ``bbox``: resize the image so its longest side is exactly ``max_side``.
       With ``bbox`` = [x1, y1, x2, y2] in pixels of the (rotated) original image: crop it (clipped
       to the image) and resize the crop by the same ``scale``, *not* to ``max_side``.

    ``draft=True`` decodes a JPEG at the largest libjpeg reduction (1/2, 1/4, 1/8) that still holds
    the full image at ``scale``, so memory follows ``max_side`` rather than the file's pixel count.
    The result has the same size as without draft and nearly the same pixels (libjpeg's scaled
    inverse DCT instead of area averaging); ``bbox``, ``scale`` and ``original_size`` stay in the
    file's full-resolution pixels. ``strict``: see :func:`load_image`.

    Raises the errors of :func:`load_image`, BoundingBoxError for a malformed or empty box, and
    ImageTooSmallError when the result has a side below ``min_side`` (too little for pool5).
    """
    label = _source_name(source, name)
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    need = (lambda h, w: _needed_size(h, w, max_side)) if draft else None
    decoded = _decode(source, label, max_pixels, MIN_IMAGE_SIDE, need, strict)
    rgb = rotate(decoded.rgb, rotation)
    height, width = decoded.size
    if (int(rotation) // 90) % 2:
        height, width = width, height
    scale = max_side / max(height, width)
    if bbox is None:
        used = None
        out = resize_to(rgb, *_longest_size(height, width, max_side))
    else:
        used = _validate_bbox(bbox, height, width, label)
        x1, y1, x2, y2 = used
        # The box in decoded pixels (the same box unless a draft decode reduced the image).
        fy, fx = rgb.shape[0] / height, rgb.shape[1] / width
        crop = rgb[
            math.floor(y1 * fy) : max(math.floor(y1 * fy) + 1, math.ceil(y2 * fy)),
            math.floor(x1 * fx) : max(math.floor(x1 * fx) + 1, math.ceil(x2 * fx)),
        ]
        out = resize_to(crop, *_scaled_size(y2 - y1, x2 - x1, scale))
    if min(out.shape[:2]) < min_side:
        what = "crop" if bbox is not None else "image"
        raise ImageTooSmallError(
            label,
            f"{what} becomes {out.shape[1]} x {out.shape[0]} px at max_side={max_side}; "
            f"the network needs each side >= {min_side} px",
        )
    return PreparedImage(
        np.ascontiguousarray(out), float(scale), (height, width), used, decoded.damage
    )
