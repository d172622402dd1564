"""Tests of selret.distributed on a small local Ray instance: encode to shards, resume, ingest, search."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

import selret.cli.distributed  # noqa: E402, F401  (registers `selret distributed`)
from selret.cli._app import app  # noqa: E402
from selret.distributed import (  # noqa: E402
    encode_collection,
    ingest_shards,
    iter_shards,
    list_shards,
    read_failures,
    shard_indexes,
)
from selret.encoding.encoder import Encoder, EncoderConfig  # noqa: E402
from selret.errors import ConfigMismatchError  # noqa: E402
from selret.features.maps import feature_maps_for  # noqa: E402
from selret.search.engine import SearchEngine, normalise_path  # noqa: E402
from selret.search.index import ImageIndex, ShardedSearch  # noqa: E402

pytestmark = pytest.mark.ray

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
    maps = feature_maps_for(good[:8], CONFIG, tmp / "cache", progress=False)
    return Encoder(CONFIG).fit(maps).save(tmp / "enc.npz")


@pytest.fixture(scope="module")
def local_ray():
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


def test_vectors_equal_local_encoding(encoded, collection, encoder_file):
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
    for path in good:
        np.testing.assert_allclose(vectors[path], local.encode_image(path), atol=1e-5, err_msg=path)


def test_corrupt_file_is_recorded(encoded, collection):
    summary, out = encoded
    _, _, corrupt = collection
    assert [p for p, _ in summary.failed] == [corrupt]
    assert summary.failed[0][1].startswith("CorruptImageError: ")
    [failure] = read_failures(out)
    assert failure["path"] == corrupt
    assert failure["error"] == "CorruptImageError"
    assert failure["reason"] == "not a recognised image format"


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


def test_ingest_refuses_shards_of_another_encoder(encoded, tmp_path):
    _, out = encoded
    shard = next(iter_shards(out))
    index = ImageIndex.create(
        tmp_path / "other", shard.vectors.shape[1], shard.encoder_config, "another-encoder"
    )
    with pytest.raises(ConfigMismatchError, match="another-encoder"):
        ingest_shards(out, index)
    assert len(ImageIndex.open(tmp_path / "other")) == 0


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
