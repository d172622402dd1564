"""Tests of selret.search: VectorIndex kinds, query expansion, the persistent ImageIndex, shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

import selret.numerics as numerics
import selret.search.storage as storage_mod
import selret.search.vectors as vectors_mod
from selret.errors import ConfigMismatchError, CorruptIndexError, IndexConflictError
from selret.numerics import blas_brute_force
from selret.search.expansion import average_query_expansion
from selret.search.sharded import ShardedSearch
from selret.search.store import ImageIndex
from selret.search.vectors import VectorIndex, choose_kind, recall_at_k

D = 32
CONFIG = {"d": D, "mask": "sift", "embedding": "faemb"}


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # The test machines share few cores; OpenMP threads spinning against other processes make
    # faiss training several times slower than one thread.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int = D, seed: int = 0, n_clusters: int = 50) -> np.ndarray:
    """Unit vectors around random centres: like image descriptors, not uniform on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    return unit_rows(centres[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, d)))


def brute_force(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def paths(n: int, start: int = 0) -> list[str]:
    return [f"/photos/img{i:05d}.jpg" for i in range(start, start + n)]


# ===================================================================== VectorIndex


@pytest.mark.parametrize("kind", vectors_mod.KINDS)
def test_search_finds_each_vector_under_its_id(kind):
    x = clustered(600)
    ids = np.arange(600, dtype=np.int64) * 7 + 3  # arbitrary, non-contiguous ids
    index = VectorIndex(D, kind)
    index.add(x, ids)
    scores, found = index.search(x[:20], 5)
    assert scores.shape == found.shape == (20, 5)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    # IVF-PQ scores are computed from codes: its own vector is near the top, not surely first
    own = (found[:, 0] == ids[:20]) if kind != "ivfpq" else (found == ids[:20, None]).any(axis=1)
    assert own.all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert index.ntotal == len(index) == 600 and index.index_kind == kind


def test_exact_search_equals_brute_force():
    x, q = clustered(500, seed=1), clustered(10, seed=2)
    ids = np.arange(1000, 1500, dtype=np.int64)
    index = VectorIndex(D)
    index.add(x, ids)
    scores, found = index.search(q, 10)
    np.testing.assert_array_equal(found, brute_force(x, ids, q, 10))
    np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :10], atol=1e-5)


FAISS_SETTINGS = (
    "distance_compute_blas_threshold",
    "distance_compute_blas_query_bs",
    "distance_compute_blas_database_bs",
    "distance_compute_min_k_reservoir",
)


def faiss_settings() -> dict:
    return {name: getattr(faiss.cvar, name) for name in FAISS_SETTINGS}


@pytest.mark.parametrize("kind", vectors_mod.KINDS)
def test_a_query_scores_the_same_alone_and_in_a_batch(kind):
    # faiss's BLAS and per-query kernels round differently and it picks one by batch size; with
    # vectors of norm 8 (scores up to 64) any such rounding difference exceeds 1e-6.
    x, q = 8 * clustered(600, seed=40), 8 * clustered(64, seed=41)
    index = VectorIndex(D, kind)
    index.add(x, np.arange(600) + 5)
    batch_scores, batch_ids = index.search(q, 10)
    for i in range(len(q)):
        scores, ids = index.search(q[i], 10)
        np.testing.assert_allclose(scores[0], batch_scores[i], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(ids[0], batch_ids[i])


def test_importing_selret_search_leaves_faiss_settings_alone():
    code = f"""
import importlib, pkgutil, faiss
names = {FAISS_SETTINGS!r}
before = [getattr(faiss.cvar, n) for n in names], faiss.omp_get_max_threads()
import selret.search
for module in pkgutil.walk_packages(selret.search.__path__, "selret.search."):
    importlib.import_module(module.name)
after = [getattr(faiss.cvar, n) for n in names], faiss.omp_get_max_threads()
assert before == after, (before, after)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_training_and_searching_leave_faiss_settings_alone():
    before = faiss_settings()
    for kind in vectors_mod.KINDS:
        index = VectorIndex(D, kind)
        index.add(clustered(400, seed=42), np.arange(400))  # IVF-PQ, IVF, binary: trained here
        index.search(clustered(30, seed=43), 5)
    assert faiss_settings() == before
    with blas_brute_force(), blas_brute_force():  # nested, as from threads
        assert faiss.cvar.distance_compute_blas_threshold == min(
            before["distance_compute_blas_threshold"], numerics._BLAS_THRESHOLD
        )
    assert faiss_settings() == before


def test_search_pads_with_minus_one_and_minus_inf():
    index = VectorIndex(D)
    scores, found = index.search(np.ones(D, np.float32), 3)  # empty index, 1-D query
    assert (found == -1).all() and np.isneginf(scores).all() and found.shape == (1, 3)
    index.add(clustered(2), [10, 11])
    scores, found = index.search(clustered(4), 5)
    assert (found[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    assert set(found[0, :2]) == {10, 11}


def test_add_rejects_bad_input():
    index = VectorIndex(D)
    index.add(clustered(3), [1, 2, 3])
    with pytest.raises(ValueError, match="already indexed"):
        index.add(clustered(1), [2])
    with pytest.raises(ValueError, match="duplicates"):
        index.add(clustered(2), [5, 5])
    with pytest.raises(ValueError, match="shape"):
        index.add(np.ones((1, D + 1), np.float32), [6])
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, D), np.nan, np.float32), [6])
    with pytest.raises(ValueError, match=">= 0"):
        index.add(clustered(1), [-1])
    with pytest.raises(ValueError, match="positive"):
        index.search(clustered(1), 0)
    assert index.ntotal == 3


@pytest.mark.parametrize("kind", vectors_mod.KINDS)
def test_remove_keeps_other_ids_and_vectors(kind):
    x = clustered(600, seed=3)
    ids = np.arange(600, dtype=np.int64) + 100
    index = VectorIndex(D, kind)
    index.add(x, ids)
    before = index.reconstruct(ids[50:60])
    assert index.remove([100, 101, 102, 10**9]) == 3  # unknown ids are ignored
    assert index.ntotal == 597
    _, found = index.search(x[:10], 10)
    assert not np.isin(found, [100, 101, 102]).any()
    own = found[3:, 0] == ids[3:10] if kind != "ivfpq" else (found[3:] == ids[3:10, None]).any(1)
    assert own.all()
    np.testing.assert_array_equal(index.reconstruct(ids[50:60]), before)
    with pytest.raises(KeyError):
        index.reconstruct(100)


def test_reconstruct_is_exact_for_raw_kinds_and_close_for_ivfpq():
    x = clustered(600, seed=4)
    ids = np.arange(600)
    for kind in ("exact", "hnsw", "ivf", "binary"):
        index = VectorIndex(D, kind)
        index.add(x, ids)
        np.testing.assert_array_equal(index.reconstruct(7), x[7])
        np.testing.assert_array_equal(index.reconstruct([9, 3]), x[[9, 3]])
    index = VectorIndex(D, "ivfpq")
    index.add(x, ids)
    error = np.linalg.norm(index.reconstruct(ids) - x, axis=1)
    assert error.mean() < 0.5  # unit vectors: PQ codes keep the direction


def test_hnsw_tombstones_are_compacted():
    x = clustered(400, seed=5)
    ids = np.arange(400)
    index = VectorIndex(D, "hnsw")
    index.add(x, ids)
    index.remove(ids[:50])  # 12.5 %: tombstones
    assert index._n_dead == 50
    index.remove(ids[50:150])  # 37.5 % > HNSW_COMPACT_FRACTION: rebuilt
    assert index._n_dead == 0 and index.ntotal == 250
    _, found = index.search(x[150:160], 1)
    np.testing.assert_array_equal(found[:, 0], ids[150:160])
    assert not np.isin(index.search(x[:150], 10)[1], ids[:150]).any()


@pytest.mark.parametrize("kind", vectors_mod.KINDS)
def test_save_load_round_trip(kind, tmp_path):
    x = clustered(600, seed=6)
    ids = np.arange(600) * 2
    index = VectorIndex(D, kind, ef_search=64, nprobe=8, k_factor=20)
    index.add(x, ids)
    index.remove([0, 2])  # HNSW: tombstones must survive the file
    index.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss")
    assert (loaded.index_kind, loaded.ntotal, loaded.dim) == (kind, 598, D)
    setting = {
        "exact": None,
        "hnsw": ("ef_search", 64),
        "ivfpq": ("nprobe", 8),
        "ivf": ("nprobe", 8),
        "binary": ("k_factor", 20),
    }[kind]
    if setting:  # the search setting of the kind is kept in its file
        assert loaded.params[setting[0]] == setting[1]
    q = clustered(20, seed=7)
    for a, b in zip(index.search(q, 10), loaded.search(q, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.isin(loaded.search(x[:2], 10)[1], [0, 2]).any()
    with pytest.raises(ValueError, match="holds a"):
        VectorIndex.load(tmp_path / "v.faiss", kind="exact" if kind != "exact" else "hnsw")


def test_ivfpq_needs_enough_training_vectors():
    index = VectorIndex(D, "ivfpq")
    assert not index.is_trained
    with pytest.raises(ValueError, match="training vectors"):
        index.add(clustered(100), np.arange(100))
    with pytest.raises(ValueError, match="untrained"):
        index.save("unused.faiss")
    index.train(clustered(400))  # explicit training, then any batch size
    index.add(clustered(5), np.arange(5))
    assert index.is_trained and index.ntotal == 5


def test_auto_kind_grows_through_the_thresholds(monkeypatch):
    monkeypatch.setattr(vectors_mod, "AUTO_EXACT_MAX", 300)
    assert [choose_kind(n) for n in (299, 300, 10**7)] == ["exact", "ivf", "ivf"]
    x = clustered(800, seed=8)
    ids = np.arange(800) + 1
    index = VectorIndex(D, "auto")
    kinds = []
    for batch in np.array_split(np.arange(800), 4):
        index.add(x[batch], ids[batch])
        kinds.append(index.index_kind)
    assert kinds == ["exact", "ivf", "ivf", "ivf"] and index.kind == "auto"
    assert index.ntotal == 800
    _, found = index.search(x[::80], 1)
    np.testing.assert_array_equal(found[:, 0], ids[::80])


def test_approximate_recall_against_exact():
    x, q = clustered(5000, seed=9), clustered(100, seed=10)
    ids = np.arange(5000)
    exact = VectorIndex(D)
    exact.add(x, ids)
    _, truth = exact.search(q, 10)
    hnsw = VectorIndex(D, "hnsw", ef_construction=64)
    hnsw.add(x, ids)
    assert recall_at_k(hnsw.search(q, 10)[1], truth, 10) >= 0.95  # measured 0.979
    ivfpq = VectorIndex(D, "ivfpq", pq_m=16)  # 2 dimensions per byte
    ivfpq.train(x[:2000])
    ivfpq.add(x, ids)
    recall = recall_at_k(ivfpq.search(q, 10)[1], truth, 10)
    assert recall >= 0.75  # measured 0.86
    ivfpq.nprobe = 1  # fewer lists visited: cheaper and worse
    assert recall_at_k(ivfpq.search(q, 10)[1], truth, 10) < recall


def test_recall_at_k():
    exact = np.array([[1, 2, 3, -1], [4, 5, 6, 7]])
    assert recall_at_k(exact, exact, 4) == 1.0
    approx = np.array([[3, 9, 1, -1], [7, 8, 9, 10]])
    # row 0: 2 of the 3 real neighbours; row 1: 1 of 4
    assert recall_at_k(approx, exact, 4) == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert recall_at_k(approx, exact, 1) == pytest.approx(0.0)


def test_average_query_expansion_lifts_a_positive():
    # q sees three near-duplicates of a view (a), distractors (d) beyond them, and the positive
    # p last; p is far from q but close to the view a, so averaging q with a brings p up.
    e = np.eye(D, dtype=np.float32)
    rng = np.random.default_rng(11)
    views = unit_rows(e[0] + 0.7 * e[1] + 0.05 * rng.standard_normal((3, D)))
    distractors = unit_rows(e[0] + 0.9 * e[2:8])
    positive = unit_rows((0.5 * e[0] + e[1])[None])
    x = np.concatenate([views, distractors, positive])
    index = VectorIndex(D)
    index.add(x, np.arange(len(x)))
    p_id = len(x) - 1
    _, plain = index.search(e[0], len(x))
    _, expanded = average_query_expansion(e[0], index, k=3, n_results=len(x))
    rank_plain, rank_qe = list(plain[0]).index(p_id), list(expanded[0]).index(p_id)
    assert rank_plain == len(x) - 1 and rank_qe == 3


def test_average_query_expansion_shapes():
    x = clustered(300, seed=12)
    index = VectorIndex(D)
    index.add(x, np.arange(300))
    scores, found = average_query_expansion(x[:4], index, k=5, n_results=8)
    assert scores.shape == found.shape == (4, 8) and (found >= 0).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    _, default_k = average_query_expansion(x[:4], index, k=5)
    assert default_k.shape == (4, 5)
    _, empty = average_query_expansion(x[:2], VectorIndex(D), k=3)
    assert (empty == -1).all()


# ===================================================================== ImageIndex


def make_index(root, n=40, seed=20, **kwargs) -> tuple[ImageIndex, np.ndarray]:
    index = ImageIndex.create(root, D, CONFIG, "fp-A", **kwargs)
    x = clustered(n, seed=seed)
    index.add(paths(n), x, [{"label": i % 3} for i in range(n)])
    index.save()
    return index, x


def test_image_index_round_trip(tmp_path):
    index, x = make_index(tmp_path / "idx")
    index.add(
        ["/photos/extra.jpg"],
        clustered(1, seed=21),
        [{"width": np.int64(640), "height": 480, "content_sha1": "ab" * 20, "k": "v"}],
    )
    hits = index.search(x[:3], 4)
    assert [h[0].path for h in hits] == paths(3)
    assert hits[0][0].metadata == {"label": 0} and hits[0][0].score == pytest.approx(1.0)
    assert len(index) == 41 and index.info()["unsaved_changes"]
    index.save()

    reopened = ImageIndex.open(tmp_path / "idx", expected_fingerprint="fp-A")
    assert len(reopened) == 41 and reopened.encoder_config == CONFIG
    assert reopened.search(x[:3], 4) == hits
    record = reopened.get("/photos/extra.jpg")
    assert (record.width, record.height, record.content_sha1, record.metadata) == (
        640,
        480,
        "ab" * 20,
        {"k": "v"},
    )
    assert reopened.get(record.id) == record
    with pytest.raises(KeyError):
        reopened.get("/photos/nope.jpg")
    info = reopened.info()
    assert info["count"] == 41 and info["dim"] == D and info["index_kind"] == "exact"
    assert not info["unsaved_changes"] and info["encoder_fingerprint"] == "fp-A"
    manifest = json.loads((tmp_path / "idx" / info["state"] / "manifest.json").read_text())
    assert manifest["count"] == 41 and manifest["encoder_config"] == CONFIG
    assert sorted(os.listdir(tmp_path / "idx")) == ["CURRENT", "LOCK", info["state"]]


def test_create_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileExistsError):
        ImageIndex.create(tmp_path, D, CONFIG, "fp-A")
    with pytest.raises(FileNotFoundError, match="not a selret index"):
        ImageIndex.open(tmp_path)


def test_incremental_add_skips_indexed_paths(tmp_path):
    index, x = make_index(tmp_path / "idx", n=10)
    batch = paths(15)  # 10 indexed + 5 new
    assert index.missing(batch + batch[-1:]) == batch[10:]
    vectors = clustered(16, seed=22)
    new_ids = index.add(batch + batch[-1:], vectors)  # the last path twice: added once
    assert len(new_ids) == 5 and len(index) == 15
    assert index.missing(batch) == [] and index.add(batch[:3], vectors[:3]) == []
    # already-indexed paths keep their original vectors
    assert index.search(x[0], 1)[0][0].score == pytest.approx(1.0)
    assert index.get(batch[14]).id == new_ids[-1]


def test_ids_are_stable_after_remove_and_never_reused(tmp_path):
    index, x = make_index(tmp_path / "idx", n=10)
    ids = {p: index.get(p).id for p in paths(10)}
    assert index.remove([paths(10)[0], ids[paths(10)[9]], 10**6, "/photos/unknown.jpg"]) == 2
    index.save()
    reopened = ImageIndex.open(tmp_path / "idx")
    assert len(reopened) == 8
    for p in paths(10)[1:9]:
        assert reopened.get(p).id == ids[p]
    hit = reopened.search(x[5], 1)[0][0]
    assert (hit.id, hit.path) == (ids[paths(10)[5]], paths(10)[5])
    assert reopened.missing(paths(10)) == [paths(10)[0], paths(10)[9]]
    [new_id] = reopened.add(["/photos/new.jpg"], clustered(1, seed=23))
    assert new_id > max(ids.values())  # the removed largest id is not handed out again


@pytest.mark.parametrize(
    "failing", ["write_vectors", "write_catalog", "write_manifest", "commit_pointer"]
)
def test_save_is_atomic_under_a_crash(tmp_path, monkeypatch, failing):
    root = tmp_path / "idx"
    index, x = make_index(root, n=20)
    index.save()
    committed = index.search(x, 3)
    index.remove(paths(5))
    index.add(paths(8, start=100), clustered(8, seed=24))

    def crash(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(storage_mod, failing, crash)
    with pytest.raises(OSError, match="disk on fire"):
        index.save()
    old = ImageIndex.open(root, expected_fingerprint="fp-A")  # consistency checked on open
    assert len(old) == 20 and old.missing(paths(20)) == []
    assert old.search(x, 3) == committed
    assert old.missing(paths(8, start=100)) == paths(8, start=100)

    monkeypatch.undo()
    index.save()  # the same handle still holds the changes and commits them now
    new = ImageIndex.open(root)
    assert len(new) == 23 and new.missing(paths(5)) == paths(5)
    assert len(list(root.glob("state-*"))) == 1  # the crashed attempt's leftovers are gone


def test_open_detects_catalog_and_vectors_that_disagree(tmp_path):
    index, _ = make_index(tmp_path / "a", n=10)
    other, _ = make_index(tmp_path / "b", n=12)
    state_a = tmp_path / "a" / index.info()["state"]
    state_b = tmp_path / "b" / other.info()["state"]
    os.replace(state_b / "vectors.faiss", state_a / "vectors.faiss")
    with pytest.raises(CorruptIndexError, match="disagree"):
        ImageIndex.open(tmp_path / "a")


def test_open_refuses_another_encoder(tmp_path):
    make_index(tmp_path / "idx", n=3)
    with pytest.raises(ConfigMismatchError) as err:
        ImageIndex.open(tmp_path / "idx", expected_fingerprint="fp-B")
    message = str(err.value)
    assert str(tmp_path / "idx") in message and "fp-A" in message and "fp-B" in message
    assert '"mask": "sift"' in message  # the stored config
    with pytest.raises(ConfigMismatchError, match="mask: index 'sift' vs encoder 'max'"):
        ImageIndex.open(tmp_path / "idx", "fp-B", expected_config={**CONFIG, "mask": "max"})
    assert len(ImageIndex.open(tmp_path / "idx", expected_fingerprint="fp-A")) == 3


def test_second_writer_cannot_overwrite_the_first(tmp_path):
    make_index(tmp_path / "idx", n=5)
    first, second = ImageIndex.open(tmp_path / "idx"), ImageIndex.open(tmp_path / "idx")
    first.add(["/photos/a.jpg"], clustered(1, seed=25))
    first.save()
    second.add(["/photos/b.jpg"], clustered(1, seed=26))
    with pytest.raises(IndexConflictError, match="another writer"):
        second.save()
    assert ImageIndex.open(tmp_path / "idx").missing(["/photos/a.jpg", "/photos/b.jpg"]) == [
        "/photos/b.jpg"
    ]


def test_failed_add_leaves_the_catalog_unchanged(tmp_path):
    index = ImageIndex.create(tmp_path / "idx", D, CONFIG, "fp-A", kind="ivfpq")
    with pytest.raises(ValueError, match="training vectors"):
        index.add(paths(10), clustered(10))
    assert len(index) == 0 and index.missing(paths(10)) == paths(10)
    index.add(paths(300), clustered(300, seed=27))  # enough to train on
    index.save()
    reopened = ImageIndex.open(tmp_path / "idx")
    assert reopened.info()["index_kind"] == "ivfpq" and len(reopened) == 300


def test_image_index_query_expansion(tmp_path):
    index, x = make_index(tmp_path / "idx", n=50)
    hits = index.search(x[:2], 5, query_expansion=3)
    assert [len(h) for h in hits] == [5, 5] and hits[0][0].path == paths(1)[0]


# ===================================================================== ShardedSearch


def test_sharded_search_equals_one_index(tmp_path):
    x, q = clustered(90, seed=30), clustered(6, seed=31)
    whole = ImageIndex.create(tmp_path / "whole", D, CONFIG, "fp-A")
    whole.add(paths(90), x)
    shards = []
    for n, part in enumerate(np.array_split(np.arange(90), 3)):
        shard = ImageIndex.create(tmp_path / f"shard{n}", D, CONFIG, "fp-A")
        shard.add([paths(90)[i] for i in part], x[part])
        shards.append(shard)
    sharded = ShardedSearch(shards)
    assert len(sharded) == 90
    for qe in (0, 3):
        expected = whole.search(q, 10, query_expansion=qe)
        got = sharded.search(q, 10, query_expansion=qe)
        assert [[h.path for h in row] for row in got] == [[h.path for h in row] for row in expected]
        np.testing.assert_allclose(
            [[h.score for h in row] for row in got],
            [[h.score for h in row] for row in expected],
            atol=1e-5,
        )
    hit = sharded.search(x[75], 1)[0][0]
    assert hit.shard == 2 and shards[2].get(hit.id).path == hit.path


def test_sharded_search_refuses_mixed_encoders(tmp_path):
    a = ImageIndex.create(tmp_path / "a", D, CONFIG, "fp-A")
    b = ImageIndex.create(tmp_path / "b", D, CONFIG, "fp-B")
    with pytest.raises(ConfigMismatchError, match="fp-B"):
        ShardedSearch([a, b])
    with pytest.raises(ValueError):
        ShardedSearch([])
