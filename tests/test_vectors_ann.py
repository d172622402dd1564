"""Tests of the re-ranking index kinds ("ivf", "binary"), the binary codes and exact re-scoring.

Small random data only; the figures at 100k and 1M come from ``benchmarks/search_speed.py``.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import selret.search.vectors as vectors_mod
from selret.search.binary import BinaryEncoder, HammingShortlist, hamming_distances
from selret.search.kernels import rescore_top_k
from selret.search.vectors import VectorIndex, choose_kind, recall_at_k

D = 32


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # shared test machines: spinning OpenMP threads slow training
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int = D, seed: int = 0, n_clusters: int = 50) -> np.ndarray:
    """Unit vectors around random centres, like image descriptors."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    x = centres[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def db_and_queries(n: int, n_queries: int, d: int = D, seed: int = 0):
    """``n`` vectors to index and ``n_queries`` new ones of the same distribution (same centres)."""
    x = clustered(n + n_queries, d, seed)
    return x[:n], x[n:]


def exact_ids(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


# ===================================================================== auto and "ivf"


def test_auto_index_holds_recall_on_a_clustered_set():
    # At the default threshold "auto" switches to "ivf", calibrated on the collection to keep
    # recall@10 >= 0.95 for queries like the indexed vectors.
    n = vectors_mod.AUTO_EXACT_MAX + 4000
    x, q = db_and_queries(n, 300, seed=1)
    index = VectorIndex(D, "auto")
    index.add(x, np.arange(n))
    assert index.index_kind == choose_kind(n) == "ivf"
    scores, found = index.search(q, 10)
    assert recall_at_k(found, exact_ids(x, q, 10), 10) >= 0.95  # measured 0.971
    # re-ranked: the scores are the exact inner products of the returned vectors, best first
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[found]), rtol=0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_ivf_probes_and_short_list_trade_speed_for_recall():
    x, q = db_and_queries(8000, 200, seed=3)
    truth = exact_ids(x, q, 10)
    index = VectorIndex(D, "ivf", nlist=128, pq_m=4)  # coarse codes: 8 dimensions per 4 bits
    index.add(x, np.arange(8000))
    recall = {}
    settings = [(1, 1), (4, 1), (4, 10), (128, 10), (128, 50)]
    for nprobe, k_factor in settings:
        index.nprobe, index.k_factor = nprobe, k_factor
        recall[nprobe, k_factor] = recall_at_k(index.search(q, 10)[1], truth, 10)
    # measured 0.20, 0.21, 0.87, 0.87, 1.0: more lists, and a longer short list re-ranked
    assert [recall[s] for s in settings] == sorted(recall.values())
    assert recall[128, 50] >= 0.95  # every list visited: only the PQ short list can miss
    assert index.settings == {
        "nlist": 128, "pq_m": 4, "nprobe": 128, "scan_bytes": 2, "k_factor": 50
    }  # fmt: skip


def test_ivf_with_default_lists_is_retrained_as_it_grows():
    x = clustered(6000, seed=5)
    index = VectorIndex(D, "ivf")
    index.add(x[:1000], np.arange(1000))
    first = index.settings["nlist"]
    index.add(x[1000:3000], np.arange(1000, 3000))  # 3x the training size: kept
    assert index.settings["nlist"] == first
    index.add(x[3000:], np.arange(3000, 6000))  # 6x >= IVF_RETRAIN_GROWTH: retrained on all
    assert index.settings["nlist"] > first
    _, found = index.search(x[::500], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(0, 6000, 500))
    fixed = VectorIndex(D, "ivf", nlist=20)  # lists set by the user: never retrained
    fixed.add(x[:500], np.arange(500))
    fixed.add(x[500:], np.arange(500, 6000))
    assert fixed.settings["nlist"] == 20


@pytest.mark.parametrize("kind", ["ivf", "binary"])
def test_removed_rows_are_dropped_once_they_are_a_quarter(kind):
    x = clustered(1200, seed=6)
    ids = np.arange(1200) * 5
    index = VectorIndex(D, kind)
    index.add(x, ids)
    index.remove(ids[:200])  # 17 %: marked dead, still stored
    assert index._index.n_dead == 200 and index.ntotal == 1000
    assert not np.isin(index.search(x[:200], 10)[1], ids[:200]).any()
    index.remove(ids[200:400])  # 33 % > 25 %: rows dropped, short list rebuilt
    assert index._index.n_dead == 0 and len(index._index._slot_ids) == 800
    _, found = index.search(x[400:420], 1)
    np.testing.assert_array_equal(found[:, 0], ids[400:420])
    np.testing.assert_array_equal(index.reconstruct(ids[1199]), x[1199])


def test_ivf_needs_enough_training_vectors():
    with pytest.raises(ValueError, match="divide"):
        VectorIndex(D, "ivf", pq_m=3)
    index = VectorIndex(D, "ivf", nlist=100)
    with pytest.raises(ValueError, match="training vectors"):
        index.add(clustered(50), np.arange(50))
    assert not index.is_trained


def test_a_corrupt_refined_file_is_refused(tmp_path):
    path = tmp_path / "v.faiss"
    np.savez(path.open("wb"), header=np.array('{"magic": "something else"}'))
    with pytest.raises(ValueError, match=str(path.name)):
        VectorIndex.load(path)


# ===================================================================== exact re-scoring


def test_rescore_top_k_is_exact_with_padding_and_ties():
    base = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0.5]], np.float32)
    q = np.array([[1, 0], [0, 2]], np.float32)
    cand = np.array([[2, -1, 0, 3], [1, 3, -1, -1]], np.int64)
    scores, rows = rescore_top_k(base, q, cand, 3)
    # row 0: rows 0 and 2 tie at 1.0 (row order), then row 3 at 0.5; -1 never comes back
    np.testing.assert_array_equal(rows, [[0, 2, 3], [1, 3, -1]])
    np.testing.assert_allclose(scores[0], [1, 1, 0.5])
    np.testing.assert_allclose(scores[1, :2], [2, 1])
    assert np.isneginf(scores[1, 2])


# ===================================================================== binary codes


def test_binary_codes_shapes_and_settings_errors():
    x = clustered(300, seed=7)
    encoder = BinaryEncoder(n_bits=16).fit(x)
    codes = encoder.transform(x[:5])
    assert codes.shape == (5, 2) and codes.dtype == np.uint8
    assert encoder.projection_.shape == (D, 16)
    for bad in (12, 64, 0):
        with pytest.raises(ValueError, match="n_bits"):
            BinaryEncoder(n_bits=bad).fit(x)
    with pytest.raises(ValueError, match="rotation"):
        BinaryEncoder(rotation="median").fit(x)
    with pytest.raises(ValueError, match="not fitted"):
        BinaryEncoder().transform(x)
    with pytest.raises(ValueError, match="n_bits"):
        VectorIndex(D, "binary", n_bits=40)


def test_unrotated_bits_are_the_signs_of_the_centred_coordinates():
    x = np.random.default_rng(8).standard_normal((10, 16)).astype(np.float32)
    encoder = BinaryEncoder(rotation="none").fit(np.concatenate([x, -x]))  # mean 0
    bits = np.unpackbits(encoder.transform(x), axis=1)
    np.testing.assert_array_equal(bits, (x > 0).astype(np.uint8))


def test_itq_rotation_is_orthogonal_and_quantizes_better_than_pca():
    x = clustered(2000, seed=9)
    losses = {}
    for rotation in ("pca", "itq"):
        encoder = BinaryEncoder(rotation=rotation).fit(x)
        p = encoder.projection_
        np.testing.assert_allclose(p.T @ p, np.eye(D), atol=1e-5)
        v = encoder.project(x)
        losses[rotation] = np.square(np.sign(v) - v).sum()
    assert losses["itq"] < 0.97 * losses["pca"]  # the quantity ITQ minimises


def test_hamming_distances_against_a_hand_computed_case():
    codes = np.array([[0b00000000, 0b00000000], [0b11110000, 0b00000001], [0xFF, 0xFF]], np.uint8)
    np.testing.assert_array_equal(
        hamming_distances(codes, codes), [[0, 5, 16], [5, 0, 11], [16, 11, 0]]
    )
    shortlist = HammingShortlist(16)
    shortlist.add(codes, np.array([10, 20, 30]))
    dist, labels = shortlist.search(codes[[1]], 4)
    np.testing.assert_array_equal(labels, [[20, 10, 30, -1]])
    np.testing.assert_array_equal(dist[0, :3], [0, 5, 11])


def test_binary_index_reranks_to_the_exact_top1_and_beats_hamming_order():
    x, q = db_and_queries(3000, 200, seed=10)
    ids = np.arange(3000) + 7
    index = VectorIndex(D, "binary")
    index.add(x, ids)
    scores, found = index.search(x[:100], 5)
    np.testing.assert_array_equal(found[:, 0], ids[:100])  # each vector finds itself first
    np.testing.assert_allclose(scores[:, 0], np.einsum("nd,nd->n", x[:100], x[:100]), atol=1e-6)
    truth = exact_ids(x, q, 10) + 7
    recall = []
    for k_factor in (1, 5, 50):  # 1: a short list of 10, Hamming order decides membership
        index.k_factor = k_factor
        recall.append(recall_at_k(index.search(q, 10)[1], truth, 10))
    assert recall == sorted(recall) and recall[-1] >= 0.95  # measured 0.29, 0.94, 1.0
    index.k_factor = None  # back to the calibrated short list: shorter, still on target
    assert index.settings["k_factor"] < 50
    assert recall_at_k(index.search(q, 10)[1], truth, 10) >= 0.95  # measured 0.98 (k_factor 6)


def test_calibration_warns_when_the_target_is_out_of_reach(caplog):
    # Isotropic vectors coded by one 4-bit sub-quantizer: even every list and the longest short
    # list tried cannot reach recall 0.999, and the user is told so.
    x = np.random.default_rng(12).standard_normal((3000, D)).astype(np.float32)
    index = VectorIndex(D, "ivf", pq_m=1, target_recall=0.999)
    with caplog.at_level("WARNING", logger="selret.search.refined"):
        index.add(x, np.arange(3000))
    assert "falls short of the target" in caplog.text
    assert caplog.text.count("k_factor=") == 1  # the effort, each knob named once
    assert index.settings["nprobe"] == index.settings["nlist"]  # the most effort is kept
    assert index.settings["k_factor"] == 40  # the longest short list tried (4 x 10)


def test_calibration_is_kept_in_the_file_and_redone_as_the_index_doubles(tmp_path):
    x = clustered(3400, seed=13)
    index = VectorIndex(D, "ivf", nlist=40)  # fixed lists: only the calibration changes
    index.add(x[:900], np.arange(900))
    assert index._index.calibrated == {} and index.settings["nprobe"] == 40  # all lists
    index.add(x[900:1500], np.arange(900, 1500))  # past CALIBRATE_MIN: calibrated
    first = index.settings
    assert index._index.calibrated_at == 1500 and first["nprobe"] < 40
    index.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss")
    assert loaded.settings == first and loaded._index.calibrated_at == 1500
    loaded.add(x[1500:2900], np.arange(1500, 2900))  # under 2 x 1500: kept
    assert loaded._index.calibrated_at == 1500
    loaded.add(x[2900:], np.arange(2900, 3400))  # 3400 >= 2 x 1500: calibrated again
    assert loaded._index.calibrated_at == 3400
    index.nprobe = 7  # a value set by the user wins over calibration
    assert index.settings["nprobe"] == 7


def test_a_small_ivf_trains_without_a_flood_of_faiss_warnings(capfd):
    # 300 vectors give each 16-centroid sub-quantizer fewer than faiss's 39 points per centroid;
    # faiss used to print one warning line per sub-quantizer (16 here, 256 at 512-D).
    x = clustered(300, seed=5)
    index = VectorIndex(D, "ivf")
    index.add(x, np.arange(300))
    assert "WARNING" not in capfd.readouterr().err
    assert (index.search(x[:5], 1)[1][:, 0] == np.arange(5)).all()
