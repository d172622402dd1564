"""A corpus of bad (and tricky but good) image files, generated in code: ``make_corpus(folder)``.

Used by the fuzz tests of the decoder, ``selret extract``, ``selret search`` and the HTTP service.
Every file is small (at most 256 px a side, a few KB), except that a few *headers* claim huge sizes
(decompression bombs) without the pixel data to match. Nothing binary is committed: the bytes are
made here, with Pillow or by hand.

Each :class:`BadFile` says what selret must do with it under its default settings (strict decoding,
``DEFAULT_MAX_PIXELS``, no draft decoding):

- ``good``: a valid image that must be accepted when read directly (``load_image``, a list file, an
  upload);
- ``expect``: for the others, the name of the ``selret.errors`` class that must refuse it;
- ``skip``: the ``Skipped.kind`` a folder scan (``selret.files.scan_images``) reports it with, or
  None when the scan lists it as an image (a folder scan never reads a skipped file);
- ``damaged``: it decodes, but its data is damaged; refused by default (CorruptImageError) and
  accepted with ``strict=False`` / ``--accept-damaged``.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BadFile", "base_image", "make_corpus", "png_chunk", "png_header_only", "upright"]

# Pillow's transpose applied by ImageOps.exif_transpose for each EXIF orientation (2-8).
_EXIF_METHODS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# The inverse of each (the stored pixels are the upright image transformed back).
_EXIF_INVERSE = {
    **_EXIF_METHODS,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class BadFile:
    """One corpus entry; see the module docstring for the meaning of the fields."""

    name: str  # path relative to the corpus folder
    path: Path
    kind: str  # unique short id, e.g. "jpeg-corrupt-middle"
    good: bool
    expect: str | None = None
    skip: str | None = None
    damaged: bool = False

    def data(self) -> bytes | None:
        """The bytes to upload, or None when the entry is no readable regular file (a FIFO, a
        folder, a broken link, an unreadable file)."""
        try:
            if not self.path.is_file() or self.path.is_fifo():
                return None
            return self.path.read_bytes()
        except OSError:
            return None


def base_image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A photo-like H x W x 3 uint8 image: gradients, blocks of colour and mild noise, asymmetric
    (every flip or rotation of it differs from it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    rgb[h // 8 : h // 2, w // 10 : w // 3] = (220, 40, 30)  # top-left block only
    rgb[2 * h // 3 :, 3 * w // 4 :] = (20, 30, 200)
    rgb += rng.normal(0, 6, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def upright(kind: str) -> np.ndarray | None:
    """The upright pixels an ``exif-orientation-N`` entry must load as (its base image)."""
    return base_image(64, 96, seed=3) if kind.startswith("exif-orientation-") else None


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming ``width`` x ``height`` and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def _jpeg_header_only(width: int, height: int) -> bytes:
    """SOI + a baseline SOF0 claiming ``width`` x ``height`` (3 components), then EOI."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def _encode(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _scan_start(jpeg: bytes) -> int:
    """Offset of the first entropy-coded byte (after the first SOS header)."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def _overwrite(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def _corrupt_middle(jpeg: bytes, n: int, fill: bytes | None) -> bytes:
    """``n`` bytes in the middle of the entropy-coded data replaced (by ``fill`` repeated, or by
    fixed pseudo-random bytes without 0xFF, so the marker structure stays intact)."""
    start = _scan_start(jpeg)
    mid = (start + len(jpeg) - 2) // 2
    if fill is None:
        new = np.random.default_rng(7).integers(0, 255, n, dtype=np.uint8).tobytes()
    else:
        new = fill * n
    return _overwrite(jpeg, mid, new[:n])


def _png_bad_crc(png: bytes) -> bytes:
    """The CRC of the first IDAT chunk flipped; the data itself intact (Pillow does not check it)."""
    at = png.index(b"IDAT") - 4
    length = int.from_bytes(png[at : at + 4], "big")
    crc_at = at + 8 + length
    return _overwrite(png, crc_at, bytes(b ^ 0xFF for b in png[crc_at : crc_at + 4]))


def _exif_jpeg(orientation: int) -> bytes:
    up = Image.fromarray(upright(f"exif-orientation-{orientation}"))
    stored = up.transpose(_EXIF_INVERSE[orientation]) if orientation > 1 else up
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _garbage_exif_jpeg(base: np.ndarray) -> bytes:
    """A JPEG whose APP1 Exif segment holds garbage (the pixels are fine)."""
    jpeg = _encode(base, "JPEG", quality=90)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xde\xad\xbe\xef" * 8
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + app1 + jpeg[2:]


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("photo.jpg", b"not really")
    return buf.getvalue()


def _gif(frames: list[np.ndarray]) -> bytes:
    images = [Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    return _encode(images[0], "GIF", save_all=len(images) > 1, append_images=images[1:])


def _tiff_pages(pages: list[np.ndarray]) -> bytes:
    images = [Image.fromarray(p) for p in pages]
    return _encode(
        images[0], "TIFF", save_all=True, append_images=images[1:], compression="tiff_deflate"
    )


def _float_tiff(values: np.ndarray) -> bytes:
    return _encode(Image.fromarray(values.astype(np.float32), mode="F"), "TIFF")


def make_corpus(folder: Path) -> list[BadFile]:
    """Write the corpus into ``folder`` (created; should be empty) and describe every entry.

    Entries the platform cannot make are left out: FIFOs without ``os.mkfifo``, symbolic links
    where they are not permitted, and the unreadable file when running as root (who reads it all
    the same).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_image()
    jpeg = _encode(base, "JPEG", quality=90)
    png = _encode(base, "PNG")
    out: list[BadFile] = []

    def add(name: str, kind: str, content: bytes | Callable[[Path], None], **kw) -> None:
        path = folder / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        out.append(BadFile(name, path, kind, good=kw.pop("good", False), **kw))

    def good(name: str, kind: str, content, skip: str | None = None) -> None:
        add(name, kind, content, good=True, skip=skip)

    def bad(name: str, kind: str, content, expect: str, skip=None, damaged=False) -> None:
        add(name, kind, content, expect=expect, skip=skip, damaged=damaged)

    rng = np.random.default_rng(1)
    grey = base.mean(axis=2).astype(np.uint8)

    # ---------------------------------------------------------------- good: formats and modes
    good("jpeg-rgb.jpg", "jpeg-rgb", jpeg)
    good("jpeg-progressive.jpg", "jpeg-progressive", _encode(base, "JPEG", progressive=True))
    good("jpeg-grey.jpg", "jpeg-grey", _encode(grey, "JPEG"))
    good("jpeg-cmyk.jpg", "jpeg-cmyk", _encode(Image.fromarray(base).convert("CMYK"), "JPEG"))
    good("png-rgb.png", "png-rgb", png)
    rgba = np.dstack([base, np.linspace(0, 255, base.shape[1], dtype=np.uint8)[None].repeat(96, 0)])
    good("png-rgba.png", "png-rgba", _encode(rgba, "PNG"))
    good("png-16bit.png", "png-16bit", _encode(grey.astype(np.uint16) * 257, "PNG"))
    palette = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    good("png-palette-transparency.png", "png-palette-transparency",
         _encode(palette, "PNG", transparency=0))  # fmt: skip
    good("png-la.png", "png-la", _encode(Image.fromarray(grey).convert("LA"), "PNG"))
    good("png-grey.png", "png-grey", _encode(grey, "PNG"))
    good("gif-static.gif", "gif-static", _gif([base]))
    good("gif-animated.gif", "gif-animated", _gif([base, 255 - base, base[::-1]]))
    good("webp.webp", "webp", _encode(base, "WEBP", quality=80))
    small = base_image(48, 64)
    good("tiff-multipage.tif", "tiff-multipage", _tiff_pages([small, 255 - small]))
    good("tiff-float.tif", "tiff-float", _float_tiff(grey / 255.0))
    good("bmp.bmp", "bmp", _encode(base, "BMP"))
    good("ppm.ppm", "ppm", _encode(base, "PPM"))
    good("tiny-16.png", "tiny-16", _encode(base[:16, :16], "PNG"))
    for orientation in range(1, 9):
        good(f"exif-{orientation}.jpg", f"exif-orientation-{orientation}", _exif_jpeg(orientation))
    exif9 = Image.Exif()
    exif9[0x0112] = 9  # no such orientation: ignored
    good("exif-invalid-9.jpg", "exif-invalid-orientation",
         _encode(base, "JPEG", exif=exif9.tobytes()))  # fmt: skip
    good("exif-garbage.jpg", "exif-garbage", _garbage_exif_jpeg(base))
    good("jpeg-trailing-zeros.jpg", "jpeg-trailing-zeros", jpeg + b"\x00" * 64)
    good("jpeg-appended-jpeg.jpg", "jpeg-appended-jpeg",
         jpeg + _encode(base[:32, :32], "JPEG"))  # fmt: skip

    # ---------------------------------------------------------------- good: names and links
    good("png-named.jpg", "png-named-jpg", png)
    good("café 写真 ü.jpg", "unicode-name", jpeg)
    good("my photo.png", "space-name", png)
    good("-dash.jpg", "dash-name", jpeg)
    good("UPPER.JPG", "upper-extension", jpeg)
    good("l" * 200 + ".jpg", "long-name", jpeg)
    good(".hidden.jpg", "hidden", jpeg, skip="hidden")
    good("no-extension", "no-extension", jpeg, skip="extension")
    try:
        os.symlink("jpeg-rgb.jpg", folder / "link-good.jpg")
        out.append(BadFile("link-good.jpg", folder / "link-good.jpg", "symlink-good", good=True))
    except (OSError, NotImplementedError):
        pass

    # ---------------------------------------------------------------- bad: not images at all
    bad("empty.jpg", "empty", b"", "EmptyImageError")
    bad("text.jpg", "text-named-jpg", b"this is not an image\n", "CorruptImageError")
    bad("page.png", "html-named-png", b"<!DOCTYPE html><html><body>hi</body></html>\n",
        "CorruptImageError")  # fmt: skip
    bad("archive.jpg", "zip-named-jpg", _zip_bytes(), "CorruptImageError")
    bad("noise.jpg", "random-bytes", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        "CorruptImageError")  # fmt: skip
    bad("soi-only.jpg", "jpeg-soi-only", b"\xff\xd8\xff", "CorruptImageError")
    bad("signature-only.png", "png-signature-only", b"\x89PNG\r\n\x1a\n", "CorruptImageError")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>\n'
    bad("vector.svg", "svg", svg, "CorruptImageError", skip="extension")
    bad("vector-svg.png", "svg-named-png", svg, "CorruptImageError")

    # ---------------------------------------------------------------- bad: truncated or broken
    bad("truncated.jpg", "jpeg-truncated", jpeg[: len(jpeg) // 2], "CorruptImageError")
    bad("truncated.png", "png-truncated", png[: len(png) // 2], "CorruptImageError")
    bad("truncated.gif", "gif-truncated", _gif([base])[:300], "CorruptImageError")
    bad("truncated.webp", "webp-truncated", _encode(base, "WEBP")[:200], "CorruptImageError")
    bad("truncated.bmp", "bmp-truncated", _encode(base, "BMP")[:1000], "CorruptImageError")
    tiff = _encode(base, "TIFF")
    bad("garbage.tif", "tiff-garbage", tiff[:8] + b"\xab" * 64, "CorruptImageError")
    zero_width = struct.pack(">IIBBBBB", 0, 64, 8, 2, 0, 0, 0)
    bad("zero-width.png", "png-zero-width",
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", zero_width) + png_chunk(b"IEND", b""),
        "CorruptImageError")  # fmt: skip

    # ---------------------------------------------------------------- bad: decodes, but damaged
    bad("corrupt-middle.jpg", "jpeg-corrupt-middle", _corrupt_middle(jpeg, 32, None),
        "CorruptImageError", damaged=True)  # fmt: skip
    bad("zeroed-middle.jpg", "jpeg-zeroed-middle", _corrupt_middle(jpeg, 200, b"\x00"),
        "CorruptImageError", damaged=True)  # fmt: skip
    bad("trailing-garbage.jpg", "jpeg-trailing-garbage", jpeg + b"GARBAGE after the end" * 8,
        "CorruptImageError", damaged=True)  # fmt: skip
    bad("bad-crc.png", "png-bad-crc", _png_bad_crc(png), "CorruptImageError", damaged=True)
    bad("trailing-garbage.png", "png-trailing-garbage", png + b"GARBAGE after IEND" * 8,
        "CorruptImageError", damaged=True)  # fmt: skip
    nan = grey / 255.0
    nan[10:20, 10:40] = np.nan
    bad("nan.tif", "tiff-nan", _float_tiff(nan), "CorruptImageError", damaged=True)

    # ---------------------------------------------------------------- bad: size
    bad("one-pixel.png", "one-pixel", _encode(base[:1, :1], "PNG"), "ImageTooSmallError")
    bad("tiny-8.jpg", "tiny-8", _encode(base[:8, :8], "JPEG"), "ImageTooSmallError")
    bad("strip.png", "strip-256x8", _encode(np.tile(base[:8], (1, 2, 1)), "PNG"),
        "ImageTooSmallError")  # fmt: skip
    # 9000 x 9000 = 81 MP: over selret's 64 MP cap, under Pillow's own limits.
    bad("over-cap.png", "png-over-cap", png_header_only(9000, 9000), "ImageTooLargeError")
    # 7999 x 7999 passes the cap; the missing pixel data then fails the decode, fast.
    bad("under-cap.png", "png-under-cap-no-data", png_header_only(7999, 7999),
        "CorruptImageError")  # fmt: skip
    bad("bomb.png", "png-bomb", png_header_only(100_000, 100_000), "ImageTooLargeError")
    bad("bomb.jpg", "jpeg-bomb", _jpeg_header_only(60_000, 60_000), "ImageTooLargeError")

    # ---------------------------------------------------------------- bad: not regular files
    def symlink(target: str):
        return lambda path: os.symlink(target, path)

    try:
        add("broken-link.jpg", "broken-link", symlink("does-not-exist.jpg"),
            expect="ImageNotFoundError", skip="broken-link")  # fmt: skip
        (folder / "linked-folder").mkdir()
        Image.fromarray(base).save(folder / "linked-folder" / "inside.png")
        out.append(BadFile("linked-folder/inside.png", folder / "linked-folder" / "inside.png",
                           "inside-linked-folder", good=True))  # fmt: skip
        add("folder-link", "link-to-folder", symlink("linked-folder"),
            expect="ImageNotFoundError", skip="link-to-folder")  # fmt: skip
    except (OSError, NotImplementedError):
        pass
    if hasattr(os, "mkfifo"):
        add("pipe.jpg", "fifo", os.mkfifo, expect="ImageNotFoundError", skip="not-a-file")
    add("folder.jpg", "dir-named-jpg", lambda p: p.mkdir(), expect="ImageNotFoundError",
        skip="not-a-file")  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() != 0:

        def unreadable(path: Path) -> None:
            path.write_bytes(jpeg)
            path.chmod(0)

        add("unreadable.jpg", "unreadable", unreadable, expect="ImageNotFoundError")
    return out
