"""The bad-file corpus (tests/badfiles.py) through the decoder and the folder scan: every file is
accepted or refused with its documented error class, naming the file and the reason, and the folder
scan lists or reports every entry, none silently."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from badfiles import BadFile, base_image, make_corpus, upright
from conftest import data_dir
from PIL import Image

import selret.errors
from selret.features.integrity import jpeg_damage
from selret.features.io import image_size, load_image, prepare_image
from selret.files import scan_images

# Headers that claim huge sizes on purpose; every other entry is at most 256 px a side.
HUGE = {"png-over-cap", "png-under-cap-no-data", "png-bomb", "jpeg-bomb"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[BadFile]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def by_kind(corpus) -> dict[str, BadFile]:
    return {b.kind: b for b in corpus}


def test_corpus_is_large_varied_and_small(corpus):
    kinds = [b.kind for b in corpus]
    assert len(set(kinds)) == len(kinds) >= 40
    assert sum(b.good for b in corpus) >= 20 and sum(not b.good for b in corpus) >= 25
    for b in corpus:
        assert b.good == (b.expect is None), b.kind
        assert b.expect is None or issubclass(getattr(selret.errors, b.expect), Exception)
        data = b.data()
        if data is not None:
            assert len(data) < 64 * 1024, b.kind  # a few KB each: generated, never committed
            if b.good and b.kind not in HUGE:
                with Image.open(b.path) as img:
                    assert max(img.size) <= 256, b.kind


def _outcome(source, **kw) -> str | None:
    """None when accepted, else the error class name (after checking the message)."""
    try:
        rgb = load_image(source, **kw)
    except selret.errors.ImageError as exc:
        assert exc.reason and str(exc).startswith(f"{exc.path}: ")
        return type(exc).__name__
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    return None


def test_every_file_accepted_or_refused_as_documented(corpus):
    for b in corpus:
        assert _outcome(b.path) == b.expect, b.kind
        try:
            load_image(b.path)
        except selret.errors.ImageError as exc:
            assert exc.path == str(b.path)  # the error names the file
        data = b.data()
        if data is not None:  # the same bytes uploaded: the same verdict
            assert _outcome(data, name=b.name) == b.expect, b.kind


def test_damaged_files_accepted_when_not_strict(corpus):
    damaged = [b for b in corpus if b.damaged]
    assert {b.kind for b in damaged} >= {
        "jpeg-corrupt-middle", "jpeg-zeroed-middle", "jpeg-trailing-garbage", "png-bad-crc",
        "tiff-nan",
    }  # fmt: skip
    for b in damaged:
        assert _outcome(b.path, strict=False) is None, b.kind
        assert prepare_image(b.path, max_side=64, strict=False).damage, b.kind
    for b in corpus:
        if not b.damaged:  # strict=False changes nothing else
            assert _outcome(b.path, strict=False) == b.expect, b.kind


def test_prepare_and_draft_agree_on_verdicts(corpus):
    for b in corpus:
        for draft in (False, True):
            try:
                prepare_image(b.path, max_side=64, draft=draft)
                got = None
            except selret.errors.ImageError as exc:
                got = type(exc).__name__
            assert got == b.expect, (b.kind, draft)


def test_image_size_matches_decode(corpus):
    for b in corpus:
        if b.good:
            assert image_size(b.path) == load_image(b.path).shape[:2], b.kind


def test_exif_orientations_load_upright(corpus):
    kinds = by_kind(corpus)
    expected = upright("exif-orientation-1")
    # Every orientation of the upright picture: the decode must match the upright one best.
    others = [Image.fromarray(expected).transpose(t) for t in Image.Transpose]
    candidates = [expected] + [np.asarray(c) for c in others if c.size == (96, 64)]
    for orientation in range(1, 9):
        rgb = load_image(kinds[f"exif-orientation-{orientation}"].path).astype(int)
        assert rgb.shape == expected.shape, orientation
        errors = sorted(np.abs(rgb - c).mean() for c in candidates)
        assert np.abs(rgb - expected).mean() == errors[0] < 8, orientation  # JPEG noise only
        assert errors[1] > 3 * errors[0], orientation  # and far from any other orientation


def test_first_frame_of_animations_and_pages(corpus):
    kinds = by_kind(corpus)
    first = load_image(kinds["gif-animated"].path).astype(int)
    assert np.abs(first - base_image()).mean() < 12  # the first frame (palette-quantised)
    assert np.abs(first - (255 - base_image())).mean() > 60
    page = load_image(kinds["tiff-multipage"].path)
    np.testing.assert_array_equal(page, base_image(48, 64))


def test_folder_scan_lists_or_reports_every_entry(corpus):
    folder = corpus[0].path.parent
    scan = scan_images(folder)
    listed = set(scan.images)
    skipped = {s.path: s for s in scan.skipped}
    for b in corpus:
        if b.skip is None:
            assert b.path in listed, b.kind
        else:
            assert b.path in skipped and skipped[b.path].kind == b.skip, b.kind
            assert skipped[b.path].reason, b.kind
    # Nothing at the top level is left out without a word.
    for entry in os.listdir(folder):
        path = folder / entry
        assert path in listed or path in skipped or path.is_dir(), entry
    assert listed == {b.path for b in corpus if b.skip is None}
    assert sum(scan.skipped_counts().values()) == len(scan.skipped)


def test_list_file_keeps_every_entry_in_order(corpus, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(b.path) for b in corpus) + "\n", encoding="utf-8")
    scan = scan_images(listing)
    assert scan.images == [b.path for b in corpus] and scan.skipped == []


def test_single_image_file_as_source_and_binary_list_refused(corpus, tmp_path):
    jpeg = by_kind(corpus)["jpeg-rgb"].path
    assert scan_images(jpeg).images == [jpeg]
    binary = tmp_path / "list.bin"
    binary.write_bytes(jpeg.read_bytes())
    with pytest.raises(selret.errors.DatasetError, match="not UTF-8"):
        scan_images(binary)


def _sample(folder: Path, every: int) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))[::every]


def test_no_false_alarm_on_real_photos():
    """The damage check passes the real photos of the data sets (all 1977 pass; a sample here)."""
    photos = _sample(data_dir("paris6k-250"), 5) + _sample(data_dir("ukbench-56"), 2)
    assert len(photos) >= 70
    flagged = [(p, r) for p in photos if (r := jpeg_damage(p.read_bytes())) is not None]
    assert flagged == []
