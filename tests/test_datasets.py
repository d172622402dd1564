"""Ground-truth readers, on the real files in ../shared/data when present and on small files
written here in the same formats."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from selret.evaluation.datasets import (
    DatasetError,
    Query,
    RetrievalBenchmark,
    add_distractors,
    load_benchmark,
    read_gnd_mat,
    read_gnd_pkl,
    read_holidays,
    read_image_list,
    read_object_folders,
    read_oxford_gt,
    read_paris6k_250,
    read_rotation_list,
    read_smvs,
    read_ukbench,
    ukbench_groups,
    write_gnd,
)
from selret.evaluation.metrics import compute_map, compute_map_revisited

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GT = DATA / "ground-truth"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def names(bench: RetrievalBenchmark, idx: list[int]) -> list[str]:
    return sorted(bench.db_images[i] for i in idx)


def by_name(bench: RetrievalBenchmark, name: str) -> Query:
    (q,) = [q for q in bench.queries if q.name == name]
    return q


# ----------------------------------------------------------------------------- real Oxford / Paris


@pytest.fixture(scope="module")
def oxford_gt():
    return read_oxford_gt(need(GT / "oxford5k_gt_files_170407"))


@pytest.fixture(scope="module")
def oxford_mat():
    return read_gnd_mat(need(GT / "gnd_mat" / "gnd_oxford5k.mat"))


def test_oxford_gt_files(oxford_gt):
    assert len(oxford_gt.queries) == 55
    q = by_name(oxford_gt, "all_souls_1")
    # all_souls_1_good.txt has 24 names and _ok.txt 54: positives = good + ok.
    assert len(q.positives) == 24 + 54
    assert len(q.junk) == 33
    assert q.image == "all_souls_000013.jpg"  # 'oxc1_' prefix stripped
    assert q.bbox == (136.5, 34.1, 648.5, 955.7)
    assert oxford_gt.db_images[q.image_index] == q.image
    q = by_name(oxford_gt, "christ_church_1")
    assert (len(q.positives), len(q.junk)) == (51 + 27, 55)
    assert q.bbox == (204.8, 6.8, 409.6, 546.1)
    # Without an image folder the database is only the labelled images (documented).
    assert len(oxford_gt) < 5063


def test_oxford_gnd_mat_matches_gt_files(oxford_gt, oxford_mat):
    assert len(oxford_mat) == 5063
    assert len(oxford_mat.queries) == 55
    q = oxford_mat.queries[0]
    assert (q.name, q.image, q.image_index) == ("all_souls_1", "all_souls_000013.jpg", 11)
    assert q.bbox == (136.5, 34.1, 648.5, 955.7)
    assert oxford_mat.db_images[0] == "all_souls_000000.jpg"
    # The .mat is 1-based: read right, every query's sets equal the official gt files, by name.
    for a, b in zip(oxford_gt.queries, oxford_mat.queries, strict=True):
        assert a.name == b.name and a.image == b.image
        assert names(oxford_gt, a.positives) == names(oxford_mat, b.positives)
        assert names(oxford_gt, a.junk) == names(oxford_mat, b.junk)


def test_paris_gt_files_and_mat_agree():
    gt = read_oxford_gt(need(GT / "paris6k_gt_files_120310"))
    mat = read_gnd_mat(need(GT / "gnd_mat" / "gnd_paris6k.mat"))
    assert len(gt.queries) == len(mat.queries) == 55
    assert len(mat) == 6392
    q = by_name(gt, "defense_1")
    assert (len(q.positives), len(q.junk)) == (0 + 117, 116)  # Paris good lists are empty
    assert q.image == "paris_defense_000605.jpg"
    assert q.bbox == (130.0, 17.0, 843.0, 732.0)
    for a, b in zip(gt.queries, mat.queries, strict=True):
        assert names(gt, a.positives) == names(mat, b.positives)
        assert names(gt, a.junk) == names(mat, b.junk)


@pytest.mark.slow
def test_oxford105k_mat_extends_oxford5k(oxford_mat):
    big = read_gnd_mat(need(GT / "gnd_mat" / "gnd_Oxford105k.mat"))
    assert len(big) == 105134
    for a, b in zip(oxford_mat.queries, big.queries, strict=True):
        assert names(oxford_mat, a.positives) == names(big, b.positives)


# ----------------------------------------------------------------------------- real Holidays


def test_holidays_perfect_result_matches_mat():
    h = read_holidays(
        need(GT / "holidays" / "perfect_result_derived.dat"),
        GT / "holidays" / "holidays_images.dat",
    )
    assert len(h.queries) == 500 and len(h) == 1491
    q = h.queries[0]  # line '100000.jpg 0 100001.jpg 1 100002.jpg'
    assert (q.name, q.image, q.positives, q.junk, q.bbox) == (
        "100000",
        "100000.jpg",
        [1, 2],
        [0],
        None,
    )
    assert sum(len(q.positives) for q in h.queries) == 1491 - 500
    mat = read_gnd_mat(need(GT / "gnd_mat" / "gnd_holidays.mat"))
    assert mat.db_images == h.db_images
    for a, b in zip(h.queries, mat.queries, strict=True):
        assert (a.name, a.positives, a.junk) == (b.name, b.positives, b.junk)


# ----------------------------------------------------------------------------- real small sets


def test_paris6k_250_protocols():
    root = need(DATA / "paris6k-250")
    off = load_benchmark(root, protocol="official-12")
    assert len(off) == 250 and len(off.queries) == 12
    q = by_name(off, "defense_4")
    assert q.image == "jpg/defense/paris_defense_000056.jpg"
    assert (len(q.positives), len(q.junk), q.bbox) == (39, 8, (8.0, 104.0, 707.0, 913.0))
    assert off.query_path(q).is_file()
    loo = read_paris6k_250(root / "ground_truth.json", protocol="loo")
    # ok labels per landmark: invalides 48, defense 39, louvre 39, eiffel 34, moulinrouge 32,
    # triomphe 3 -> one query per (image, landmark) ok label.
    assert len(loo.queries) == 48 + 39 + 39 + 34 + 32 + 3
    q = by_name(loo, "defense/paris_defense_000000")
    assert len(q.positives) == 38 and q.image_index not in q.positives
    assert q.junk[-1] == q.image_index and len(q.junk) == 8 + 1
    assert by_name(loo, "eiffel/paris_eiffel_000266").image.startswith("jpg/eiffel_tower/")


def test_smvs_and_ukbench():
    smvs = load_benchmark("smvs", root=need(DATA / "smvs-dvd-covers"))
    assert len(smvs) == 100 and len(smvs.queries) == 400
    assert all(p.startswith("Reference/") for p in smvs.db_images)
    assert sorted({q.category for q in smvs.queries}) == ["Canon", "Droid", "E63", "Palm"]
    q = by_name(smvs, "Droid/007")
    assert q.positives == [6] and smvs.db_images[6] == "Reference/007.jpg"
    assert smvs.query_path(q).is_file()

    uk = read_ukbench(need(DATA / "ukbench-56" / "jpg"))
    assert len(uk) == len(uk.queries) == 56
    groups = ukbench_groups(uk)
    assert len(set(groups.tolist())) == 14
    assert uk.queries[5].positives == [4, 5, 6, 7]  # ukbench00005 is in group 1, itself included
    assert uk.metrics == ("ns-score",) and uk.gnd()[5] == {"ok": [4, 5, 6, 7], "junk": []}
    # Leave-one-out is a scoring protocol: the raw group is kept, the query itself becomes junk.
    loo = read_ukbench(DATA / "ukbench-56" / "jpg", protocol="loo")
    assert loo.queries == uk.queries and loo.protocol == "loo"
    assert loo.gnd()[5] == {"ok": [4, 6, 7], "junk": [5]} == uk.gnd("loo")[5]


# ----------------------------------------------------------------------------- MATLAB format


def test_gnd_mat_zero_based_qidx_variant(tmp_path):
    import scipy.io

    imlist = np.array([["a"], ["b"], ["c"]], dtype=object)
    gnd = np.zeros((1, 1), dtype=[("ok", object), ("junk", object), ("bbx", object)])
    gnd[0, 0] = (np.array([[2], [3]]), np.array([[1]]), np.array([[1.0, 2.0, 3.0, 4.0]]))
    scipy.io.savemat(
        tmp_path / "gnd_toy.mat", {"imlist": imlist, "qidx": np.array([[1]]), "gnd": gnd}
    )
    b = read_gnd_mat(tmp_path / "gnd_toy.mat")
    # No index 0 and no names to check against: MATLAB 1-based indexing.
    assert (b.queries[0].positives, b.queries[0].junk, b.queries[0].image) == ([1, 2], [0], "a.jpg")
    assert b.queries[0].bbox == (1.0, 2.0, 3.0, 4.0) and b.name == "toy"


def test_gnd_mat_errors(tmp_path):
    import scipy.io

    bad = tmp_path / "gnd_bad.mat"
    bad.write_bytes(b"not a mat file at all")
    with pytest.raises(DatasetError, match="gnd_bad.mat.*MATLAB"):
        read_gnd_mat(bad)
    scipy.io.savemat(tmp_path / "gnd_nogt.mat", {"imlist": np.array([["a"]], dtype=object)})
    with pytest.raises(DatasetError, match="gnd_nogt.mat.*gnd"):
        read_gnd_mat(tmp_path / "gnd_nogt.mat")


# ----------------------------------------------------------------------------- pickles


def write_revisited_pkl(path: Path) -> Path:
    data = {
        "imlist": ["x0", "x1", "x2", "x3", "x4"],
        "qimlist": ["q0"],
        "gnd": [{"easy": [0], "hard": [2], "junk": [4], "bbx": [1, 2, 30, 40]}],
    }
    path.write_bytes(pickle.dumps(data))
    return path


@pytest.mark.parametrize(
    "protocol, positives, junk",
    [("easy", [0], [4, 2]), ("M", [0, 2], [4]), ("hard", [2], [4, 0])],
)
def test_revisited_pkl_protocols(tmp_path, protocol, positives, junk):
    b = read_gnd_pkl(write_revisited_pkl(tmp_path / "gnd_rtoy.pkl"), protocol=protocol)
    q = b.queries[0]
    # The reader keeps the raw lists whatever the protocol; the protocol applies when scoring.
    assert (q.positives, q.junk, q.easy, q.hard) == ([], [4], [0], [2])
    assert (q.image, q.image_index) == ("q0.jpg", None)
    assert (b.gnd()[0]["ok"], b.gnd()[0]["junk"]) == (positives, junk)
    assert b.protocol == {"easy": "easy", "M": "medium", "hard": "hard"}[protocol]
    assert q.bbox == (1.0, 2.0, 30.0, 40.0)
    assert b.gnd(revisited=True) == [
        {"easy": [0], "hard": [2], "junk": [4], "bbx": [1.0, 2.0, 30.0, 40.0]}
    ]


def test_revisited_pkl_roundtrip_and_evaluation(tmp_path):
    b = read_gnd_pkl(write_revisited_pkl(tmp_path / "gnd_rtoy.pkl"), protocol="easy")
    assert b.protocol == "easy"
    again = read_gnd_pkl(write_gnd(b, tmp_path / "out" / "gnd_copy.pkl"), protocol="hard")
    assert (again.queries[0].junk, again.gnd()[0]) == (
        [4],
        {"ok": [2], "junk": [4, 0], "bbx": [1.0, 2.0, 30.0, 40.0]},
    )
    assert (
        pickle.loads((tmp_path / "out" / "gnd_copy.pkl").read_bytes())["gnd"]
        == pickle.loads((tmp_path / "gnd_rtoy.pkl").read_bytes())["gnd"]
    )  # raw lists out as they came in: no protocol to undo
    ranks = np.array([[2], [0], [1], [3], [4]])
    res = compute_map_revisited(ranks, b.gnd(revisited=True))
    assert res["hard"].map == 1.0  # hard positive 2 is first
    # Easy: 2 is junk, so 0 moves to rank 0 -> AP 1; medium: 0 and 2 at ranks 1,0 -> AP 1.
    assert res["easy"].map == 1.0 and res["medium"].map == 1.0


def test_revisited_json_roundtrip_keeps_raw_lists(tmp_path):
    b = read_gnd_pkl(write_revisited_pkl(tmp_path / "gnd_rtoy.pkl"), protocol="hard")
    out = write_gnd(b, tmp_path / "r.json")
    again = load_benchmark(out)
    assert again == b and again.gnd() == b.gnd() and again.protocol == "hard"
    # Version 1 files stored junk with the protocol's additions folded in: read back raw.
    data = json.loads(out.read_text())
    data["version"], data["queries"][0]["junk"] = 1, [4, 0]
    (tmp_path / "v1.json").write_text(json.dumps(data))
    assert load_benchmark(tmp_path / "v1.json").queries == b.queries


def test_classic_pkl_and_errors(tmp_path):
    p = tmp_path / "gnd_c.pkl"
    p.write_bytes(
        pickle.dumps({"imlist": ["a", "b"], "qimlist": ["a"], "gnd": [{"ok": [1], "junk": [0]}]})
    )
    b = read_gnd_pkl(p)
    assert (b.protocol, b.queries[0].positives, b.queries[0].image_index) == ("standard", [1], 0)
    with pytest.raises(DatasetError, match="needs easy/hard"):
        read_gnd_pkl(p, protocol="hard")
    p.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [3]}]}))
    with pytest.raises(DatasetError, match=r"gnd_c.pkl: gnd\[0\]: indices outside"):
        read_gnd_pkl(p)
    p.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a readable pickle"):
        read_gnd_pkl(p)


# ----------------------------------------------------------------------------- Oxford-style folders


def write_oxford_style(gt: Path) -> None:
    gt.mkdir()
    (gt / "tower_1_query.txt").write_text("oxc1_img_a 10 20 110.5 220\n")
    (gt / "tower_1_good.txt").write_text("img_b\n")
    (gt / "tower_1_ok.txt").write_text("img_c\n\n")
    (gt / "tower_1_junk.txt").write_text("img_d\n")


def test_oxford_gt_with_image_folder(tmp_path):
    write_oxford_style(tmp_path / "gt")
    images = tmp_path / "jpg" / "sub"
    images.mkdir(parents=True)
    for n in ("img_a", "img_b", "img_c", "img_d", "img_e"):
        (images / f"{n}.jpg").write_bytes(b"")
    b = read_oxford_gt(tmp_path / "gt", tmp_path / "jpg")
    assert b.db_images == [f"sub/img_{c}.jpg" for c in "abcde"]
    q = b.queries[0]
    assert (q.name, q.positives, q.junk, q.image_index, q.bbox) == (
        "tower_1",
        [1, 2],
        [3],
        0,
        (10, 20, 110.5, 220),
    )
    assert b.image_path(4) == tmp_path / "jpg" / "sub" / "img_e.jpg"
    (images / "img_c.jpg").unlink()
    with pytest.raises(DatasetError, match="not in the database"):
        read_oxford_gt(tmp_path / "gt", tmp_path / "jpg")


def test_oxford_gt_bad_query_line(tmp_path):
    write_oxford_style(tmp_path / "gt")
    (tmp_path / "gt" / "tower_1_query.txt").write_text("img_a 1 2 3\n")
    with pytest.raises(DatasetError, match="tower_1_query.txt"):
        read_oxford_gt(tmp_path / "gt")
    with pytest.raises(DatasetError, match="no <query>_query.txt"):
        read_oxford_gt(tmp_path)


# ----------------------------------------------------------------------------- Holidays / lists


def test_holidays_format_and_rotations(tmp_path):
    pr = tmp_path / "perfect_result.dat"
    pr.write_text("1.jpg 0 2.jpg 1 3.jpg\n4.jpg 0 5.jpg\n")
    rot = tmp_path / "rot.txt"
    rot.write_text("# name degrees\n2.jpg 90\n5 -90\n")
    b = read_holidays(pr, rotations=read_rotation_list(rot))
    assert b.db_images == ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg"]
    assert [(q.positives, q.junk) for q in b.queries] == [([1, 2], [0]), ([4], [3])]
    assert (b.rotation("2.jpg"), b.rotation("5.jpg"), b.rotation("1.jpg")) == (90, 270, 0)
    pr.write_text("1.jpg 0\n")
    with pytest.raises(DatasetError, match="perfect_result.dat: line 1"):
        read_holidays(pr)
    rot.write_text("2.jpg 45\n")
    with pytest.raises(DatasetError, match="rot.txt: line 1"):
        read_rotation_list(rot)


def test_distractors(tmp_path):
    lst = tmp_path / "r1m.txt"
    lst.write_text("d1\n# comment\nd2.jpg\n")
    names_ = read_image_list(lst)
    assert names_ == ["d1", "d2.jpg"]
    base = RetrievalBenchmark(
        "toy", tmp_path / "img", ["a.jpg", "b.jpg"], [Query("q", "a.jpg", positives=[1])]
    )
    big = add_distractors(base, names_, root="/data/r1m")
    assert big.db_images[2:] == ["/data/r1m/d1.jpg", "/data/r1m/d2.jpg"]
    assert (
        big.image_path(2) == Path("/data/r1m/d1.jpg")
        and big.image_path(0) == tmp_path / "img" / "a.jpg"
    )
    assert big.queries[0].positives == [1] and len(base) == 2
    lst.write_text("\n# nothing\n")
    with pytest.raises(DatasetError, match="r1m.txt: no image names"):
        read_image_list(lst)


# ----------------------------------------------------------------------------- folders / writing


def make_object_folders(root: Path) -> Path:
    for obj, n in (("cat", 3), ("dog", 2), ("lonely", 1)):
        (root / obj).mkdir(parents=True)
        for i in range(n):
            (root / obj / f"{i}.png").write_bytes(b"")
    (root / "distractor.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def test_object_folders(tmp_path):
    b = read_object_folders(make_object_folders(tmp_path / "objs"))
    assert b.db_images == [
        "cat/0.png",
        "cat/1.png",
        "cat/2.png",
        "distractor.jpg",
        "dog/0.png",
        "dog/1.png",
        "lonely/0.png",
    ]
    # 'lonely' has no other image, so only cat (3) and dog (2) images query.
    assert [q.name for q in b.queries] == ["cat/0", "cat/1", "cat/2", "dog/0", "dog/1"]
    assert (b.queries[1].positives, b.queries[1].junk) == ([0, 2], [1])
    assert load_benchmark(tmp_path / "objs").queries == b.queries


def test_write_gnd_json_roundtrip_and_dispatch(tmp_path):
    b = read_object_folders(make_object_folders(tmp_path / "objs"))
    b.rotations = {"cat/1": 90}
    out = write_gnd(b, tmp_path / "bench.json")
    again = load_benchmark(out)
    assert again == b
    assert again.rotation("cat/1.png") == 90
    pkl = write_gnd(b, tmp_path / "bench.pkl")
    raw = pickle.loads(pkl.read_bytes())
    assert raw["gnd"][0] == {"ok": [1, 2], "junk": [0], "easy": [1, 2], "hard": []}
    assert raw["imlist"][3] == "distractor"  # '.jpg' dropped as revisitop adds it back
    classic = load_benchmark(pkl, root=tmp_path / "objs")
    assert [q.positives for q in classic.queries] == [q.positives for q in b.queries]
    assert classic.db_images == b.db_images  # names resolved against the image folder
    with pytest.raises(ValueError, match=r"\.json or \.pkl"):
        write_gnd(b, tmp_path / "bench.txt")


def test_load_benchmark_by_name_without_images():
    # Ground truth only (no image folder): names are kept, plus '.jpg'.
    ox = load_benchmark("oxford5k", root=need(GT / "gnd_mat"))
    assert (len(ox), len(ox.queries), ox.db_images[0]) == (5063, 55, "all_souls_000000.jpg")
    hol = load_benchmark("holidays", root=need(GT / "holidays"))
    assert (len(hol), len(hol.queries)) == (1491, 500)


def test_load_benchmark_errors(tmp_path):
    with pytest.raises(ValueError, match="needs root"):
        load_benchmark("oxford5k")
    with pytest.raises(DatasetError, match="no gnd_oxford5k"):
        load_benchmark("oxford5k", root=tmp_path)
    with pytest.raises(DatasetError, match="not a benchmark name"):
        load_benchmark(tmp_path / "missing.pkl")
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DatasetError, match="x.json: JSON is neither"):
        load_benchmark(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{broken")
    with pytest.raises(DatasetError, match="y.json: not a readable JSON"):
        load_benchmark(tmp_path / "y.json")


def test_missing_images_under_root_is_an_error(tmp_path):
    p = tmp_path / "gnd_c.pkl"
    p.write_bytes(pickle.dumps({"imlist": ["a", "b"], "qimlist": ["a"], "gnd": [{"ok": [1]}]}))
    (tmp_path / "jpg").mkdir()
    (tmp_path / "jpg" / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"jpg: 1 of 2 images named in .*gnd_c.pkl.*\['b'\]"):
        read_gnd_pkl(p, root=tmp_path / "jpg")


def test_benchmark_gnd_feeds_compute_map():
    b = RetrievalBenchmark(
        "toy", None, ["a.jpg", "b.jpg", "c.jpg"], [Query("q", "a.jpg", positives=[1], junk=[0])]
    )
    ranks = np.array([[0], [2], [1]])  # a (junk, removed), c, b -> positive at rank 1
    # Positive at rank 1, the first positive: precision before 0/1, at it 1/2 -> AP (0 + 1/2) / 2.
    assert compute_map(ranks, b.gnd()).map == pytest.approx(0.25)
    with pytest.raises(ValueError, match="outside 0..2"):
        RetrievalBenchmark(
            "toy", None, ["a.jpg", "b.jpg", "c.jpg"], [Query("q", "a.jpg", positives=[3])]
        )
    with pytest.raises(ValueError, match="no easy/hard"):
        b.gnd(revisited=True)


def test_smvs_group_errors(tmp_path):
    (tmp_path / "groups.json").write_text(json.dumps({"groups": {"1": ["Canon/1.jpg"]}}))
    with pytest.raises(DatasetError, match="group 1: expected one Reference/ image, found 0"):
        read_smvs(tmp_path)
