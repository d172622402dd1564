"""selret.features.cache: exact round trip, keys that follow the file, atomic writes, corrupt entries."""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import selret.features.cache
import selret.files
from selret.errors import ImageNotFoundError
from selret.features import FeatureMap
from selret.features.cache import FeatureCache

BACKBONE = "vgg16-caffe:pool5"


def make_map(seed: int = 0, shape=(8, 3, 4)) -> FeatureMap:
    rng = np.random.default_rng(seed)
    return FeatureMap(
        rng.standard_normal(shape).astype(np.float32),
        (96, 128),
        rng.uniform(0, 96, (5, 2)).astype(np.float32),
    )


def assert_same(a: FeatureMap, b: FeatureMap) -> None:
    assert b.features.dtype == np.float32
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    assert a.image_size == b.image_size


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.jpg"
    path.write_bytes(b"pretend jpeg bytes")
    return path


@pytest.fixture
def cache(tmp_path):
    return FeatureCache(tmp_path / "cache")


def test_round_trip_exact(cache, image):
    key = cache.key(image, BACKBONE, 1024)
    assert key not in cache and cache.get(key) is None and len(cache) == 0
    fmap = make_map()
    cache.put(key, fmap)
    assert key in cache and len(cache) == 1
    assert_same(fmap, cache.get(key))


def test_round_trip_no_keypoints(cache, image):
    key = cache.key(image, BACKBONE, 1024)
    cache.put(key, FeatureMap(np.ones((2, 1, 1), np.float32), (32, 32)))
    got = cache.get(key)
    # Never computed stays never computed (None), distinct from "computed, none found".
    assert got.keypoints is None and got.features.shape == (2, 1, 1)
    cache.put(key, FeatureMap(np.ones((2, 1, 1), np.float32), (32, 32), np.zeros((0, 2))))
    assert cache.get(key).keypoints.shape == (0, 2)


def test_float16_storage(tmp_path, image):
    cache = FeatureCache(tmp_path / "c16", storage="float16")
    key = cache.key(image, BACKBONE, 1024)
    fmap = make_map()
    cache.put(key, fmap)
    got = cache.get(key)
    assert got.features.dtype == np.float32
    np.testing.assert_allclose(got.features, fmap.features, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(got.features, fmap.features)  # it really was stored in half precision
    with np.load(cache.entry_path(key)) as data:
        assert data["features"].dtype == np.float16


def test_manifest_describes_config(cache, image):
    key = cache.key(image, BACKBONE, 724)
    assert cache.manifest(key) is None
    cache.put(key, make_map())
    manifest = cache.manifest(key)
    assert manifest["backbone_id"] == BACKBONE and manifest["layer"] == "pool5"
    assert manifest["max_side"] == 724 and manifest["storage"] == "float32"
    assert (cache.entry_path(key).parents[1] / "manifest.json").is_file()


def test_key_depends_on_file_and_config(cache, image):
    key = cache.key(image, BACKBONE, 1024)
    assert cache.key(image, BACKBONE, 1024) == key
    assert cache.key(image.parent / "." / image.name, BACKBONE, 1024) == key  # resolved path
    others = {
        cache.key(image, "vgg16-caffe:conv5_1", 1024),
        cache.key(image, BACKBONE, 724),
        cache.key(image, BACKBONE, 1024, bbox=[1, 2, 3, 4]),
        cache.key(image, BACKBONE, 1024, rotation=90),
    }
    assert key not in others and len(others) == 4
    # Different configs live in different folders.
    assert (
        cache.entry_path(key).parents[1]
        != cache.entry_path(cache.key(image, BACKBONE, 724)).parents[1]
    )


def test_key_follows_content_not_path_or_mtime(cache, image, tmp_path):
    key = cache.key(image, BACKBONE, 1024)
    cache.put(key, make_map())
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same bytes
    assert cache.key(image, BACKBONE, 1024) == key
    copy = tmp_path / "elsewhere" / "copy.jpg"  # a data set copied to a new place
    copy.parent.mkdir()
    shutil.copyfile(image, copy)
    assert cache.key(copy, BACKBONE, 1024) == key and cache.get(key) is not None
    # Same size, one byte changed: a different image, a different key.
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF
    image.write_bytes(bytes(data))
    edited = cache.key(image, BACKBONE, 1024)
    assert edited != key and edited not in cache
    image.write_bytes(b"other bytes, other size")
    assert cache.key(image, BACKBONE, 1024) not in {key, edited}


def test_key_of_missing_file(cache, tmp_path):
    with pytest.raises(ImageNotFoundError, match="gone.jpg"):
        cache.key(tmp_path / "gone.jpg", BACKBONE, 1024)


def test_bad_key_rejected(cache):
    with pytest.raises(ValueError, match="not a FeatureCache key"):
        cache.get("../../etc/passwd")
    assert "../../etc/passwd" not in cache


def test_discard(cache, image):
    key = cache.key(image, BACKBONE, 1024)
    cache.put(key, make_map())
    cache.discard(key)
    assert key not in cache and len(cache) == 0
    cache.discard(key)  # absent: no error


def test_overwrite(cache, image):
    key = cache.key(image, BACKBONE, 1024)
    cache.put(key, make_map(0))
    cache.put(key, make_map(1))
    assert_same(make_map(1), cache.get(key))
    assert len(cache) == 1


def _no_temp_files(cache):
    return not any(p.name.endswith(".part") for p in cache.root.rglob("*"))


@pytest.mark.parametrize("interrupt", [OSError("disk on fire"), KeyboardInterrupt()])
def test_crash_before_replace_keeps_old_entry(cache, image, monkeypatch, interrupt):
    key = cache.key(image, BACKBONE, 1024)
    old = make_map(0)
    cache.put(key, old)

    def crash(src, dst):
        raise interrupt

    monkeypatch.setattr(selret.files.os, "replace", crash)
    with pytest.raises(type(interrupt)):
        cache.put(key, make_map(1))
    monkeypatch.undo()
    assert_same(old, cache.get(key))
    assert _no_temp_files(cache) and len(cache) == 1


def test_crash_mid_write_leaves_no_entry(cache, image, monkeypatch):
    key = cache.key(image, BACKBONE, 1024)
    real_savez = np.savez

    def half_write(fh, **arrays):
        real_savez(fh, **arrays)
        fh.truncate(fh.tell() // 2)  # a partial file on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(selret.features.cache.np, "savez", half_write)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, make_map())
    monkeypatch.undo()
    assert key not in cache and cache.get(key) is None
    assert _no_temp_files(cache) and len(cache) == 0


def test_left_over_temp_file_ignored(cache, image):
    key = cache.key(image, BACKBONE, 1024)
    cache.put(key, make_map())
    (cache.entry_path(key).parent / ".abc.npz.xyz.part").write_bytes(b"partial")
    assert len(cache) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_array"])
def test_corrupt_entry_is_missing(cache, image, caplog, damage):
    key = cache.key(image, BACKBONE, 1024)
    cache.put(key, make_map())
    path = cache.entry_path(key)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        np.savez(path, features=np.zeros((2, 2, 2), np.float32))
    with caplog.at_level(logging.WARNING, logger="selret.features.cache"):
        assert cache.get(key) is None
    assert str(path) in caplog.text and "treated as missing" in caplog.text
    cache.put(key, make_map(3))  # re-extraction overwrites it
    assert_same(make_map(3), cache.get(key))


def test_concurrent_writers_of_different_keys(cache, tmp_path):
    images = []
    for i in range(16):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(bytes([i]) * (i + 1))
        images.append(p)
    keys = [cache.key(p, BACKBONE, 1024) for p in images]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ik: cache.put(ik[1], make_map(ik[0])), enumerate(keys)))
    assert len(cache) == 16 and _no_temp_files(cache)
    for i, key in enumerate(keys):
        assert_same(make_map(i), cache.get(key))


def test_keys_of_full_decodes_unchanged(tmp_path):
    """Keys computed by the cache before draft decoding existed (golden values from that
    version): existing caches stay valid."""
    path = tmp_path / "golden.bin"
    path.write_bytes(b"selret cache key golden file\n")
    cache = FeatureCache(tmp_path / "c")
    assert cache.key(path, BACKBONE, 1024) == "6e65ac22cf5f-ea1e612f3069384611a9629d03f2f6dd"
    assert cache.key(path, BACKBONE, 1024, draft=False) == cache.key(path, BACKBONE, 1024)
    crop = {"bbox": [1, 2, 30, 40.5], "rotation": 90}
    assert cache.key(path, BACKBONE, 512, **crop) == "39933edfe549-00aa90de2f9e2a5ce9d1065fff97298a"
    # Draft decodes give other pixels: same config folder, another entry.
    draft = cache.key(path, BACKBONE, 1024, draft=True)
    assert draft != cache.key(path, BACKBONE, 1024) and draft.startswith("6e65ac22cf5f-")


def test_damage_note_round_trip(cache, image):
    key = cache.key(image, BACKBONE, 1024)
    cache.put(key, make_map())
    fmap, damage = cache.get_entry(key)
    assert damage is None
    cache.put(key, make_map(1), damage="corrupt JPEG data (libjpeg: premature end)")
    fmap, damage = cache.get_entry(key)
    assert_same(make_map(1), fmap)
    assert damage == "corrupt JPEG data (libjpeg: premature end)"
    assert_same(make_map(1), cache.get(key))  # get() returns the map alone
    assert cache.get_entry(cache.key(image, BACKBONE, 512)) is None
