"""selret.features.io: decoding every colour mode, EXIF orientation, typed errors, resize and crop protocol."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from badfiles import base_image, png_header_only
from PIL import Image

from selret.errors import (
    BoundingBoxError,
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageTooSmallError,
)
from selret.features.io import (
    MIN_NETWORK_SIDE,
    load_image,
    prepare_image,
    resize_longest,
    resize_to,
    rotate,
)

RED, GREEN = (200, 30, 40), (20, 180, 60)


def two_tone(h: int = 48, w: int = 64) -> np.ndarray:
    """Left half RED, right half GREEN: colour errors and flips are both visible."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:, : w // 2] = RED
    rgb[:, w // 2 :] = GREEN
    return rgb


def save(img: Image.Image, path, fmt: str | None = None, **kw):
    img.save(path, fmt, **kw)
    return path


# --------------------------------------------------------------------------- colour modes


def test_rgb_png_is_exact(tmp_path):
    rgb = two_tone()
    out = load_image(save(Image.fromarray(rgb), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, rgb)


def test_rgb_jpeg_close(tmp_path):
    rgb = two_tone()
    out = load_image(save(Image.fromarray(rgb), tmp_path / "a.jpg", quality=95))
    assert np.abs(out[:, 4:28].astype(int) - RED).max() <= 6
    assert np.abs(out[:, 36:60].astype(int) - GREEN).max() <= 6


def test_cmyk_jpeg(tmp_path):
    rgb = two_tone()
    path = save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert np.abs(out[:, 4:28].astype(int) - RED).mean() < 8
    assert np.abs(out[:, 36:60].astype(int) - GREEN).mean() < 8


def test_grey_png(tmp_path):
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    out = load_image(save(Image.fromarray(grey, "L"), tmp_path / "g.png"))
    assert out.shape == (32, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_la_png_alpha_composited_on_white(tmp_path):
    la = np.zeros((32, 32, 2), np.uint8)
    la[..., 0] = 100
    la[:, 16:, 1] = 255  # right half opaque grey, left half fully transparent
    path = save(Image.fromarray(la, "LA"), tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    out = load_image(path)
    assert (out[:, :16] == 255).all()
    assert (out[:, 16:] == 100).all()


def test_rgba_half_transparent(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = RED
    rgba[..., 3] = 128
    out = load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    expected = np.rint(np.array(RED) * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(out[0, 0].astype(int) - expected).max() <= 1


def test_palette_png_exact(tmp_path):
    rgb = two_tone()
    pal = Image.fromarray(rgb).quantize(colors=2)
    path = save(pal, tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(load_image(path), rgb)


def test_palette_with_transparency(tmp_path):
    pal = Image.fromarray(two_tone()).quantize(colors=2)
    transparent_index = pal.getpixel((0, 0))
    path = save(pal, tmp_path / "pt.png", transparency=transparent_index)
    out = load_image(path)
    assert (out[:, :32] == 255).all()  # the transparent (formerly RED) half becomes white
    assert (out[:, 32:] == GREEN).all()


def test_16bit_png_scaled_to_8bit(tmp_path):
    grey16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    path = save(Image.fromarray(grey16), tmp_path / "g16.png")
    out = load_image(path)
    np.testing.assert_array_equal(out[..., 0], np.rint(grey16 / 257.0).astype(np.uint8))
    assert out[0, -1, 0] == 255 and out[0, 0, 0] == 0


def test_16bit_tiff(tmp_path):
    grey16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    path = save(Image.fromarray(grey16), tmp_path / "g16.tif")
    assert Image.open(path).mode.startswith("I;16")
    np.testing.assert_array_equal(
        load_image(path)[..., 1], np.rint(grey16 / 257.0).astype(np.uint8)
    )


def test_float_tiff_in_unit_range(tmp_path):
    f = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (32, 1))
    path = save(Image.fromarray(f, "F"), tmp_path / "f.tif")
    out = load_image(path)
    np.testing.assert_array_equal(out[..., 2], np.rint(f * 255).astype(np.uint8))


def test_int32_tiff_stretched(tmp_path):
    i32 = np.tile(np.linspace(-1000, 100000, 64).astype(np.int32), (32, 1))
    out = load_image(save(Image.fromarray(i32, "I"), tmp_path / "i.tif"))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()


def test_webp_lossless_exact(tmp_path):
    rgb = two_tone()
    out = load_image(save(Image.fromarray(rgb), tmp_path / "a.webp", lossless=True))
    np.testing.assert_array_equal(out, rgb)


def test_bytes_source(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(two_tone()).save(buf, "PNG")
    np.testing.assert_array_equal(load_image(buf.getvalue()), two_tone())


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    stored = np.zeros((32, 64, 3), np.uint8)  # landscape as stored
    stored[:16, :16] = 255  # white block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(Image.fromarray(stored), tmp_path / "o6.jpg", quality=95, exif=exif.tobytes())
    out = load_image(path)
    assert out.shape == (64, 32, 3)  # displayed upright: portrait
    assert out[:16, 16:].mean() > 200  # the block moved to the top-right
    assert out[:16, :16].mean() < 50


# --------------------------------------------------------------------------- bad input


def _raises(exc_type, source, match_path: str, **kw) -> ImageError:
    with pytest.raises(exc_type) as info:
        load_image(source, **kw)
    assert match_path in str(info.value)
    assert info.value.reason
    return info.value


def test_missing_file(tmp_path):
    err = _raises(ImageNotFoundError, tmp_path / "nope.jpg", "nope.jpg")
    assert "no such file" in err.reason


def test_directory(tmp_path):
    err = _raises(ImageNotFoundError, tmp_path, str(tmp_path))
    assert "directory" in err.reason


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _raises(EmptyImageError, tmp_path / "empty.jpg", "empty.jpg")
    _raises(EmptyImageError, b"", "upload.png", name="upload.png")


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_jpeg(tmp_path, keep):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * keep)])
    err = _raises(CorruptImageError, tmp_path / "cut.jpg", "cut.jpg")
    assert "truncated" in err.reason


def test_text_renamed_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    _raises(CorruptImageError, tmp_path / "notes.jpg", "notes.jpg")


def test_decompression_bomb_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    _raises(ImageTooLargeError, tmp_path / "bomb.png", "bomb.png")


def test_max_pixels_checked_before_decoding(tmp_path):
    # 9000 x 9000 is below Pillow's own limit; the file has no pixel data at all, so only a check on
    # the header (not a decode) can give ImageTooLargeError rather than CorruptImageError.
    (tmp_path / "big.png").write_bytes(png_header_only(9000, 9000))
    err = _raises(ImageTooLargeError, tmp_path / "big.png", "big.png")
    assert "81000000" in err.reason
    with pytest.raises(CorruptImageError):
        load_image(tmp_path / "big.png", max_pixels=None)


def test_max_pixels_configurable(tmp_path):
    path = save(Image.fromarray(two_tone()), tmp_path / "a.png")
    _raises(ImageTooLargeError, path, "a.png", max_pixels=48 * 64 - 1)
    assert load_image(path, max_pixels=48 * 64).shape == (48, 64, 3)


@pytest.mark.parametrize("size", [(1, 1), (15, 200)])
def test_too_small(tmp_path, size):
    path = save(Image.new("RGB", size), tmp_path / "tiny.png")
    _raises(ImageTooSmallError, path, "tiny.png")


# --------------------------------------------------------------------------- resize


@pytest.mark.parametrize(
    ("h", "w", "max_side", "expected"),
    [
        (768, 1024, 1024, (768, 1024)),  # already at size
        (600, 800, 1024, (768, 1024)),  # up-scaled
        (2000, 1500, 1024, (1024, 768)),  # down-scaled, portrait
        (333, 500, 1024, (682, 1024)),  # 681.98 rounds up
        (101, 301, 64, (21, 64)),
        (50, 50, 724, (724, 724)),
    ],
)
def test_resize_longest_exact(h, w, max_side, expected):
    rgb = np.zeros((h, w, 3), np.uint8)
    out, scale = resize_longest(rgb, max_side)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8
    assert scale == pytest.approx(max_side / max(h, w))


def test_resize_keeps_flat_colours():
    out, _ = resize_longest(two_tone(48, 64), 200)
    assert (out[:, :90] == RED).all() and (out[:, 110:] == GREEN).all()


def test_rotate():
    rgb = two_tone(20, 40)
    np.testing.assert_array_equal(rotate(rgb, 90), np.rot90(rgb))
    np.testing.assert_array_equal(rotate(rgb, -90), np.rot90(rgb, -1))
    np.testing.assert_array_equal(rotate(rgb, 360), rgb)
    with pytest.raises(ValueError, match="multiple of 90"):
        rotate(rgb, 45)


# --------------------------------------------------------------------------- prepare_image


@pytest.fixture
def landscape(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    return rgb, save(Image.fromarray(rgb), tmp_path / "land.png")


def test_prepare_full_image(landscape):
    rgb, path = landscape
    p = prepare_image(path, max_side=128)
    assert p.size == (64, 128) and p.scale == pytest.approx(0.64)
    assert p.original_size == (100, 200) and p.bbox is None
    np.testing.assert_array_equal(p.rgb, resize_longest(rgb, 128)[0])


def test_prepare_crop_uses_full_image_scale(landscape):
    rgb, path = landscape
    p = prepare_image(path, max_side=128, bbox=[50, 20, 150, 80])
    # Crop 100 x 60 at the full image's scale 0.64 -> 64 x 38.4 -> 64 x 38, not resized to 128.
    assert p.size == (38, 64) and p.scale == pytest.approx(0.64)
    assert p.bbox == (50, 20, 150, 80) and p.original_size == (100, 200)
    np.testing.assert_array_equal(p.rgb, resize_to(rgb[20:80, 50:150], 38, 64))


def test_prepare_crop_float_and_clipped(landscape):
    _, path = landscape
    p = prepare_image(path, max_side=128, bbox=[49.5, 19.2, 150.1, 80.0])
    assert p.bbox == (49, 19, 151, 80)  # every pixel the box touches
    p = prepare_image(path, max_side=400, bbox=[-30, -10, 120, 500])
    assert p.bbox == (0, 0, 120, 100) and p.size == (200, 240)


@pytest.mark.parametrize(
    "bbox",
    [
        [50, 20, 50, 80],
        [150, 20, 50, 80],
        [300, 10, 400, 50],
        [1, 2, 3],
        ["a", 1, 2, 3],
        [0, 0, float("nan"), 9],
        5,
    ],
)
def test_prepare_bad_bbox(landscape, bbox):
    _, path = landscape
    with pytest.raises(BoundingBoxError) as info:
        prepare_image(path, max_side=128, bbox=bbox)
    assert "land.png" in str(info.value)


def test_prepare_crop_too_small(landscape):
    _, path = landscape
    with pytest.raises(ImageTooSmallError, match="crop becomes"):
        prepare_image(path, max_side=128, bbox=[0, 0, 40, 40])  # 25.6 px < 32


def test_prepare_extreme_aspect_too_small(tmp_path):
    path = save(Image.new("RGB", (400, 20)), tmp_path / "strip.png")
    with pytest.raises(ImageTooSmallError, match=f">= {MIN_NETWORK_SIDE} px"):
        prepare_image(path, max_side=400)


def test_prepare_rotation_then_crop(landscape):
    rgb, path = landscape
    p = prepare_image(path, max_side=128, rotation=90)
    assert p.original_size == (200, 100) and p.size == (128, 64)
    np.testing.assert_array_equal(p.rgb, resize_longest(np.rot90(rgb), 128)[0])
    # The box is in the rotated image's pixels.
    p = prepare_image(path, max_side=200, rotation=-90, bbox=[0, 0, 100, 50])
    np.testing.assert_array_equal(p.rgb, np.rot90(rgb, -1)[:50, :100])


def test_image_size_reads_header_and_exif_orientation(tmp_path):
    from PIL import Image

    from selret.features.io import image_size

    img = Image.new("RGB", (40, 30), (10, 20, 30))
    plain = tmp_path / "plain.jpg"
    img.save(plain)
    assert image_size(plain) == (30, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = tmp_path / "rotated.jpg"
    img.save(rotated, exif=exif)
    assert image_size(rotated) == (40, 30)
    assert image_size(rotated) == load_image(rotated).shape[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(CorruptImageError):
        image_size(bad)


# --------------------------------------------------------------------------- damaged data


def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _scan_middle(data: bytes) -> int:
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    return (start + len(data)) // 2


def _damaged(tmp_path, name: str, data: bytes, expected_reason: str, caplog) -> np.ndarray:
    """``data`` is refused by default with ``expected_reason``; accepted with a logged warning
    (naming the file and the reason) under strict=False. Returns the accepted pixels."""
    path = tmp_path / name
    path.write_bytes(data)
    err = _raises(CorruptImageError, path, name)
    assert err.reason.startswith("damaged image data") and expected_reason in err.reason
    with caplog.at_level(logging.WARNING, logger="selret.features.io"):
        rgb = load_image(path, strict=False)
    assert any(name in r.getMessage() and expected_reason in r.getMessage() for r in caplog.records)
    prepared = prepare_image(path, max_side=64, strict=False)
    assert expected_reason in prepared.damage
    assert prepare_image(data, max_side=64, strict=False).damage == prepared.damage  # bytes too
    return rgb


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_corrupt_middle_refused(tmp_path, caplog, progressive):
    data = _jpeg(base_image(), progressive=progressive)
    at = _scan_middle(data)
    # 200 zero bytes: the entropy decoder runs out of sync (libjpeg warns and fills in grey).
    bad = data[:at] + b"\x00" * 200 + data[at + 200 :]
    clean = load_image(data)
    rgb = _damaged(
        tmp_path, "zeroed.jpg", bad, "corrupt JPEG data (libjpeg: Corrupt JPEG data", caplog
    )
    assert np.abs(rgb.astype(int) - clean).mean() > 1  # the accepted pixels are really damaged


def test_jpeg_trailing_garbage_refused(tmp_path, caplog):
    data = _jpeg(base_image())
    rgb = _damaged(
        tmp_path, "tail.jpg", data + b"<html>junk</html>" * 4, "68 bytes of trailing data", caplog
    )
    np.testing.assert_array_equal(rgb, load_image(data))  # the pixels themselves are intact


@pytest.mark.parametrize(
    "trailer",
    [b"\x00" * 100, b"\xff" * 7, "another jpeg", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 16],
    ids=["zeros", "ff-padding", "appended-jpeg", "motion-photo-mp4"],
)
def test_jpeg_known_trailers_accepted(trailer):
    data = _jpeg(base_image())
    trailer = _jpeg(base_image(32, 32)) if trailer == "another jpeg" else trailer
    np.testing.assert_array_equal(load_image(data + trailer), load_image(data))


def test_png_crc_mismatch_and_trailing_garbage_refused(tmp_path, caplog):
    buf = io.BytesIO()
    Image.fromarray(base_image()).save(buf, "PNG")
    png = buf.getvalue()
    crc_at = (
        png.index(b"IDAT")
        + 4
        + int.from_bytes(png[png.index(b"IDAT") - 4 : png.index(b"IDAT")], "big")
    )
    bad_crc = png[:crc_at] + bytes(b ^ 1 for b in png[crc_at : crc_at + 4]) + png[crc_at + 4 :]
    rgb = _damaged(tmp_path, "crc.png", bad_crc, "CRC mismatch in the 'IDAT' chunk", caplog)
    np.testing.assert_array_equal(rgb, base_image())
    _damaged(
        tmp_path, "tail.png", png + b"junk" * 5, "20 bytes of trailing data after the PNG", caplog
    )
    np.testing.assert_array_equal(load_image(png + b"\x00" * 8), base_image())  # padding is fine


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_nan_or_inf_refused(tmp_path, caplog, bad_value):
    values = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    values[5:10, 7:9] = bad_value
    path = save(Image.fromarray(values, mode="F"), tmp_path / "f.tif")
    rgb = _damaged(
        tmp_path, "f.tif", path.read_bytes(), "10 of 3072 pixels are NaN or infinite", caplog
    )
    assert (rgb[5:10, 7:9] == 0).all()  # accepted: the non-finite pixels become black


def test_clean_files_of_every_checked_format_pass(tmp_path):
    """No false alarm on clean files (the real photos of the data sets are checked in
    test_badfiles_io)."""
    rgb = base_image()
    for fmt, kw in [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("PNG", {"optimize": True}),
    ]:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt, **kw)
        load_image(buf.getvalue())  # strict: raises on any damage


def test_damage_check_leaves_stderr_alone(capfd):
    """The libjpeg warnings are captured, not printed; other output written meanwhile survives."""
    data = _jpeg(base_image())
    at = _scan_middle(data)
    bad = data[:at] + b"\x00" * 200 + data[at + 200 :]
    print("before", file=sys.stderr, flush=True)
    with pytest.raises(CorruptImageError):
        load_image(bad)
    print("after", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "before" in err and "after" in err and "Corrupt JPEG" not in err


# --------------------------------------------------------------------------- draft decoding


def _photo(h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(base_image()).resize((w, h), Image.Resampling.BICUBIC))


@pytest.mark.parametrize(
    ("size", "draft_size", "expected"),
    [
        ((800, 1200), (200, 300), (200, 300)),  # 1/4 exactly
        ((800, 1200), (201, 300), (400, 600)),  # 1/4 would lose a row: 1/2
        ((800, 1200), (90, 100), (100, 150)),  # 1/8 is the most libjpeg does
        ((800, 1200), (900, 1300), (800, 1200)),  # more than the file: full size
        ((683, 1024), (342, 512), (342, 512)),  # ceil(683 / 2) = 342 is enough
        ((683, 1024), (343, 512), (683, 1024)),
        ((17, 1000), (1, 100), (3, 125)),  # 1/8, though 17 // 1 would let Pillow go further
    ],
)
def test_load_image_draft_size(size, draft_size, expected):
    data = _jpeg(_photo(*size))
    assert load_image(data, draft_size=draft_size).shape[:2] == expected


def test_draft_size_follows_exif_orientation():
    stored = _photo(400, 800)  # landscape as stored, displayed portrait (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(stored, exif=exif.tobytes())
    # Upright the image is 800 x 400 (h x w): asking for 200 x 100 allows 1/4 on both sides.
    assert load_image(data, draft_size=(200, 100)).shape[:2] == (200, 100)
    assert load_image(data, draft_size=(100, 200)).shape[:2] == (400, 200)  # 1/2 keeps w >= 200


def test_draft_only_changes_jpeg(tmp_path):
    path = save(Image.fromarray(_photo(800, 1200)), tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(path, draft_size=(100, 150)), load_image(path))


@pytest.mark.parametrize(
    ("bbox", "rotation"),
    [(None, 0), (None, 90), ([100, 150, 900, 700], 0), ([33.3, 10, 500.5, 399], -90)],
)
def test_prepare_draft_same_geometry_close_pixels(bbox, rotation):
    data = _jpeg(_photo(800, 1200))
    full = prepare_image(data, max_side=256, bbox=bbox, rotation=rotation)
    draft = prepare_image(data, max_side=256, bbox=bbox, rotation=rotation, draft=True)
    # Same geometry, in the file's pixels: size, scale, original size, crop box.
    assert (draft.size, draft.scale, draft.original_size, draft.bbox) == (
        full.size, full.scale, full.original_size, full.bbox,
    )  # fmt: skip
    diff = np.abs(draft.rgb.astype(int) - full.rgb.astype(int))
    assert diff.mean() < 3.0, diff.mean()


def test_prepare_draft_keeps_at_least_the_network_size():
    # 1200 px wide at max_side 300: 1/4 gives exactly 300 px; at 301 it must stay at 1/2.
    data = _jpeg(_photo(800, 1200))
    assert prepare_image(data, max_side=300, draft=True).size == (200, 300)
    assert prepare_image(data, max_side=301, draft=True).size == (201, 301)
    # Up-scaling (max_side above the file's size) decodes in full: nothing to reduce.
    np.testing.assert_array_equal(
        prepare_image(data, max_side=1500, draft=True).rgb, prepare_image(data, max_side=1500).rgb
    )


def test_max_pixels_applies_to_the_draft_size():
    data = _jpeg(_photo(800, 1200))  # 0.96 MP
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 500000"):
        prepare_image(data, max_side=256, max_pixels=500_000)
    # Decoded at 1/4 (200 x 300 = 60000 px) it is within the cap, checked before decoding.
    assert prepare_image(data, max_side=256, max_pixels=500_000, draft=True).size == (171, 256)


_RSS_SCRIPT = """
import sys
from selret.features.io import prepare_image

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

# Reset the high-water mark after the imports (Linux's clear_refs "5"), so that a transient peak
# while importing cannot hide the decode's.
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = peak_kib()
prepare_image(sys.argv[1], max_side=512, draft=sys.argv[2] == "draft", max_pixels=None)
print((peak_kib() - before) // 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_draft_memory_follows_the_network_input(tmp_path):
    """A 6000 x 4000 JPEG prepared at 512 px: the full decode holds 72 MB of RGB (more with
    Pillow's padding), the 1/8 draft 1.1 MB; measured as the peak-RSS growth of a fresh process."""
    path = tmp_path / "big.jpg"
    Image.fromarray(base_image()).resize((6000, 4000), Image.Resampling.BILINEAR).save(path)
    growth = {}
    for mode in ("full", "draft"):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(path), mode],
            capture_output=True, text=True, check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        growth[mode] = int(out.stdout.split()[-1])
    assert growth["full"] > 70, growth  # MiB
    assert growth["draft"] < growth["full"] / 4, growth


def test_png_over_the_pixel_cap_is_refused_before_any_pixel_is_decoded():
    # A real compressed 8000 x 8000 PNG (about 200 KB): Pillow's getexif() on a PNG decodes every
    # pixel, which the cap must not wait for (issue 12: one such upload stalled the service).
    import io as _bytes_io
    import resource
    import time

    from PIL import Image

    from selret.errors import ImageTooLargeError
    from selret.features.io import image_size, prepare_image

    buf = _bytes_io.BytesIO()
    Image.new("RGB", (8000, 8000), (10, 20, 30)).save(buf, "PNG")
    data = buf.getvalue()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="64000000 pixels exceeds"):
        prepare_image(data, max_side=256, max_pixels=16_000_000, draft=True)
    assert time.perf_counter() - start < 0.2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100 * 1024  # KiB
    assert image_size(data) == (8000, 8000)
