"""Tests of selret.distributed: its decode and encode stages as plain Python, then (marked ``ray``)
the whole pipeline on a small local Ray instance: encode to shards, resume, ingest, search."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import selret.cli.distributed  # noqa: F401  (registers `selret distributed`)
import selret.features.io
from selret.cli._app import app
from selret.distributed import (
    EncodeActor,
    decode_batch,
    encode_collection,
    ingest_shards,
    iter_shards,
    list_shards,
    read_failures,
    shard_indexes,
)
from selret.encoding.encoder import Encoder, EncoderConfig
from selret.errors import ConfigMismatchError
from selret.features.backbones import Backbone
from selret.features.extractor import Extractor
from selret.search.engine import SearchEngine, normalise_path
from selret.search.sharded import ShardedSearch
from selret.search.store import ImageIndex

N_IMAGES = 12
BATCH_SIZE = 4
NUM_SHARDS = 3
# VLAD + sum pooling without rotation: a fixture fitted on a few tiny images cannot learn T-emb's
# 160-D whitening and rotation, whose null-space components would turn the ~1e-6 relative noise
# of a batched convolution (versus one image at a time) into O(1) differences of the vectors.
CONFIG = EncoderConfig(
    weights="random", max_side=96, d=16, k=10, kmeans_iters=5,
    mask="sift", embedding="vlad", aggregation="sum", rotation="none",
)  # fmt: skip


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, list[str], str]:
    """A folder of distinct images of two sizes, plus one corrupt file: (folder, good, corrupt)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    good = []
    for i in range(N_IMAGES):
        width, height = (96, 72) if i % 2 else (80, 96)  # two sizes: two backbone groups
        blobs = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        path = root / f"img{i:02d}.png"
        Image.fromarray(blobs).resize((width, height), Image.BICUBIC).save(path)
        good.append(normalise_path(path))
    corrupt = root / "broken.jpg"
    corrupt.write_bytes(b"this is not a JPEG")
    return root, good, normalise_path(corrupt)


@pytest.fixture(scope="module")
def encoder_file(collection, tmp_path_factory) -> Path:
    _, good, _ = collection
    tmp = tmp_path_factory.mktemp("encoder")
    maps = Extractor.for_config(CONFIG, cache=tmp / "cache").maps(good[:8], progress=False)
    return Encoder(CONFIG).fit(maps).save(tmp / "enc.npz")


# ===================================================================== the stages, without Ray


def _decode(paths, config: EncoderConfig = CONFIG) -> dict[str, np.ndarray]:
    batch = {"path": np.array([str(p) for p in paths], dtype=object)}
    return decode_batch(batch, json.dumps(config.to_dict()))


def _bug(*args, **kwargs):
    raise TypeError("a bug, not a bad image")


@pytest.fixture(scope="module")
def actor(encoder_file) -> EncodeActor:
    """An encoding actor as Ray would make it, here in the test process (CPU)."""
    return EncodeActor(str(encoder_file), Encoder.load(encoder_file).fingerprint, batch_size=2)


def test_decode_batch_records_a_bad_image(collection):
    _, good, corrupt = collection
    rows = _decode([good[0], corrupt])
    assert list(rows["error"]) == ["", "CorruptImageError"]
    assert list(rows["reason"]) == ["", "not a recognised image format"]
    h, w = int(rows["height"][0]), int(rows["width"][0])
    assert max(h, w) == CONFIG.max_side and len(rows["rgb"][0]) == h * w * 3
    assert list(rows["has_keypoints"]) == [True, False]  # the SIFT-mask needs them


def test_decode_batch_sends_no_keypoints_unless_the_mask_needs_them(collection):
    _, good, _ = collection
    rows = _decode(good[:2], EncoderConfig.from_dict({**CONFIG.to_dict(), "mask": "max"}))
    assert list(rows["error"]) == ["", ""]
    assert list(rows["has_keypoints"]) == [False, False]


def test_decode_batch_propagates_a_bug(collection, monkeypatch):
    """Only a bad image is a per-image failure; a bug fails the task (and, after Ray's retries,
    the job) instead of filing every image as failed."""
    _, good, _ = collection
    monkeypatch.setattr(selret.features.io, "resize_to", _bug)
    with pytest.raises(TypeError, match="a bug"):
        _decode(good[:1])


def test_encode_actor_matches_local_encoding(actor, collection, encoder_file, tmp_path):
    _, good, corrupt = collection
    rows = actor(_decode([*good[:5], corrupt]))
    assert list(rows["error"]) == [""] * 5 + ["CorruptImageError"]
    local = Encoder.load(encoder_file)
    extractor = Extractor.for_config(local.config, cache=tmp_path / "cache")
    for path, vector in zip(good[:5], rows["vector"], strict=False):
        expected = local.encode(extractor.feature_map(path))
        np.testing.assert_allclose(vector, expected, atol=1e-5, err_msg=path)
    assert not rows["vector"][5].any()


def test_encode_actor_network_failure_is_per_image(actor, collection, monkeypatch):
    _, good, _ = collection
    forward = Backbone.forward_maps

    def fails_on_tall_images(self, rgb_batch):  # a network error (as CUDA OOM) for 96 x 80 ones
        if rgb_batch.shape[1] == 96:
            raise RuntimeError("CUDA out of memory")
        return forward(self, rgb_batch)

    monkeypatch.setattr(Backbone, "forward_maps", fails_on_tall_images)
    rows = actor(_decode(good[:4]))  # even: 96 x 80, odd: 72 x 96
    assert list(rows["error"]) == ["RuntimeError", "", "RuntimeError", ""]
    assert rows["reason"][0] == "CUDA out of memory"
    assert rows["vector"][1].any() and rows["vector"][3].any()


def test_encode_actor_propagates_a_bug(actor, collection, monkeypatch):
    _, good, _ = collection
    rows = _decode(good[:2])
    monkeypatch.setattr(Backbone, "forward_maps", _bug)
    with pytest.raises(TypeError, match="a bug"):
        actor(rows)


# ===================================================================== on a local Ray instance


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def encoded(local_ray, collection, encoder_file, tmp_path_factory):
    """One Ray run over the collection: (summary, shard folder)."""
    root, _, _ = collection
    out = tmp_path_factory.mktemp("shards")
    summary = encode_collection(
        root, encoder_file, out, num_shards=NUM_SHARDS, batch_size=BATCH_SIZE, progress=False
    )
    return summary, out


@pytest.mark.ray
def test_vectors_equal_local_encoding(encoded, collection, encoder_file, tmp_path):
    summary, out = encoded
    _, good, _ = collection
    assert summary.n_total == N_IMAGES + 1 and summary.n_encoded == N_IMAGES
    shards = list(iter_shards(out))
    # At most ceil(13 / 3) rows (images, failed ones included) per shard, so at least 3 shards.
    assert len(shards) >= NUM_SHARDS
    assert all(len(s.paths) <= math.ceil((N_IMAGES + 1) / NUM_SHARDS) for s in shards)
    vectors = {p: v for s in shards for p, v in zip(s.paths, s.vectors, strict=True)}
    assert sorted(vectors) == sorted(good)  # each good image in exactly one shard
    assert sum(len(s.paths) for s in shards) == N_IMAGES
    local = Encoder.load(encoder_file)
    assert all(s.fingerprint == local.fingerprint for s in shards)
    extractor = Extractor.for_config(local.config, cache=tmp_path / "cache")
    for path in good:
        expected = local.encode(extractor.feature_map(path))
        np.testing.assert_allclose(vectors[path], expected, atol=1e-5, err_msg=path)


@pytest.mark.ray
def test_corrupt_file_is_recorded(encoded, collection):
    summary, out = encoded
    _, _, corrupt = collection
    assert [p for p, _ in summary.failed] == [corrupt]
    assert summary.failed[0][1].startswith("CorruptImageError: ")
    [failure] = read_failures(out)
    assert failure["path"] == corrupt
    assert failure["error"] == "CorruptImageError"
    assert failure["reason"] == "not a recognised image format"


@pytest.mark.ray
def test_rerun_resumes(encoded, collection, encoder_file, tmp_path):
    _, out = encoded
    root, _, corrupt = collection
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    before = {f.name for f in list_shards(copy)}
    result = CliRunner().invoke(
        app,
        ["distributed", "encode", str(root), "--encoder", str(encoder_file), "--out", str(copy),
         "--batch-size", str(BATCH_SIZE)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "0 encoded, 12 already in shards, 1 failed" in result.output
    # Only the corrupt file was tried again: one new shard holding no vector.
    assert [s.paths for s in iter_shards(copy) if s.path.name not in before] == [[]]
    assert [f["path"] for f in read_failures(copy)] == [corrupt]


@pytest.mark.ray
def test_ingest_into_engine_via_cli(encoded, collection, encoder_file, tmp_path):
    _, out = encoded
    _, good, corrupt = collection
    engine_dir = tmp_path / "engine"
    SearchEngine.create(engine_dir, Encoder.load(encoder_file))
    runner = CliRunner()
    result = runner.invoke(app, ["distributed", "ingest", str(out), "--index", str(engine_dir)])
    assert result.exit_code == 0, result.output
    assert f"added {N_IMAGES}, already indexed 0, 1 images failed encoding" in result.output
    assert corrupt in result.output
    engine = SearchEngine.open(engine_dir)
    assert len(engine.index) == N_IMAGES
    for path in good:
        [hit] = engine.search_image(path, k=1)
        assert hit.path == path
        assert hit.metadata == {} and engine.index.get(path).height in (72, 96)
    again = runner.invoke(app, ["distributed", "ingest", str(out), "--index", str(engine_dir)])
    assert f"added 0, already indexed {N_IMAGES}" in again.output


@pytest.mark.ray
def test_ingest_refuses_shards_of_another_encoder(encoded, tmp_path):
    _, out = encoded
    shard = next(iter_shards(out))
    index = ImageIndex.create(
        tmp_path / "other", shard.vectors.shape[1], shard.encoder_config, "another-encoder"
    )
    with pytest.raises(ConfigMismatchError, match="another-encoder"):
        ingest_shards(out, index)
    assert len(ImageIndex.open(tmp_path / "other")) == 0


@pytest.mark.ray
def test_sharded_search_equals_one_index(encoded, collection, tmp_path):
    _, out = encoded
    _, good, _ = collection
    report = ingest_shards(out, tmp_path / "all")  # a new bare ImageIndex
    assert report.added == N_IMAGES
    single = ImageIndex.open(tmp_path / "all")
    shards = shard_indexes(out, tmp_path / "per-shard")
    assert len(shards) >= NUM_SHARDS and sum(len(s) for s in shards) == N_IMAGES
    sharded = ShardedSearch(shards)
    vectors = {p: v for s in iter_shards(out) for p, v in zip(s.paths, s.vectors, strict=True)}
    queries = np.stack([vectors[p] for p in good])
    k = 5
    for path, one, many in zip(
        good, single.search(queries, k), sharded.search(queries, k), strict=True
    ):
        assert one[0].path == path and many[0].path == path
        assert [h.path for h in one] == [h.path for h in many]
        np.testing.assert_allclose([h.score for h in one], [h.score for h in many], rtol=1e-6)
    # Reopening the per-shard indexes adds nothing twice.
    assert [len(s) for s in shard_indexes(out, tmp_path / "per-shard")] == [len(s) for s in shards]
