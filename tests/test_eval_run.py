"""Evaluation runner and `selret eval`: disjointness, metrics on runs whose answer is known, reports,
contact sheets. Random weights, images of 96-128 px."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.evaluation.baselines import BaselineEncoder
from selret.evaluation.data import prepare
from selret.evaluation.datasets import (
    Query,
    RetrievalBenchmark,
    read_gnd_pkl,
    read_object_folders,
    read_ukbench,
)
from selret.evaluation.learning import LearningSetOverlapError, check_disjoint
from selret.evaluation.runs import evaluate, run
from selret.evaluation.scoring import score

# The tiny learning sets here are deliberate: the encoder's warning about them is expected.
pytestmark = pytest.mark.filterwarnings("ignore::selret.encoding.encoder.SmallLearningSetWarning")

SIZE = 128
FAST = {"kmeans_iters": 5, "kmeans_restarts": 1}


def make_image(seed: int, width: int = 160, height: int = 120) -> np.ndarray:
    """A distinctive RGB picture: smooth coloured noise with a few filled shapes."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 50, (height // 8 + 1, width // 8 + 1, 3))
    img = np.clip(rng.integers(40, 216, 3) + cv2.resize(noise, (width, height)), 0, 255).astype(
        np.uint8
    )
    for _ in range(5):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        cv2.circle(img, (x, y), int(rng.integers(8, height // 3)), colour, -1)
    return img


def view(rgb: np.ndarray, seed: int) -> np.ndarray:
    """Another view of a picture: a random crop, resized back, with a brightness change."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    y, x = int(rng.integers(0, h // 6)), int(rng.integers(0, w // 6))
    crop = rgb[y : y + h - h // 6, x : x + w - w // 6]
    return np.clip(
        cv2.resize(crop, (w, h)).astype(np.int16) + int(rng.integers(-20, 21)), 0, 255
    ).astype(np.uint8)


def save(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def write_objects(
    root: Path, n_objects: int = 4, n_views: int = 3, duplicates: bool = False, seed: int = 0
) -> Path:
    """A folder-per-object layout ``root/objNN/vM.png``. ``duplicates``: the views are exact
    copies (identical maps, so each query's copies must be its top results)."""
    for i in range(n_objects):
        img = make_image(seed + 1000 * i)
        for v in range(n_views):
            save(
                root / f"obj{i:02d}" / f"v{v}.png",
                img if duplicates else view(img, seed + 1000 * i + v),
            )
    return root


def write_learning(root: Path, n: int = 10, seed: int = 500) -> Path:
    for i in range(n):
        save(root / f"learn{i:02d}.png", make_image(seed + i))
    return root


@pytest.fixture(scope="module")
def dup_layout(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    return (
        write_objects(base / "objects", duplicates=True),
        write_learning(base / "learn"),
        base / "cache",
    )


# --------------------------------------------------------------------------- disjointness


def test_check_disjoint_sees_the_same_file_under_other_names(tmp_path):
    a = save(tmp_path / "db" / "a.png", make_image(1))
    b = save(tmp_path / "learn" / "b.png", make_image(2))
    check_disjoint([b], [a])  # disjoint: no error
    with pytest.raises(LearningSetOverlapError):
        check_disjoint([tmp_path / "learn" / ".." / "db" / "a.png"], [a])
    (tmp_path / "link.png").symlink_to(a)
    with pytest.raises(LearningSetOverlapError):
        check_disjoint([tmp_path / "link.png"], [a])
    os.link(a, tmp_path / "hard.png")
    with pytest.raises(LearningSetOverlapError) as err:
        check_disjoint([b, tmp_path / "hard.png"], [a])
    assert err.value.overlap == [tmp_path / "hard.png"]


def test_prepare_refuses_a_learning_set_that_overlaps_the_queries(dup_layout):
    objects, learn, cache = dup_layout
    bench = read_object_folders(objects)
    with pytest.raises(LearningSetOverlapError):
        prepare(
            bench,
            weights="random",
            max_side=SIZE,
            learn=[learn, objects / "obj01"],
            cache_dir=cache,
        )


# --------------------------------------------------------------------------- runs with a known answer


@pytest.mark.parametrize("method", ["encoder", "mac", "spoc+pcaw"])
def test_exact_copies_are_retrieved_first(dup_layout, method):
    objects, learn, cache = dup_layout
    bench = read_object_folders(objects)
    if method == "encoder":
        m = Encoder(
            EncoderConfig.from_preset("temb-demo-512", weights="random", max_side=SIZE, **FAST)
        )
    elif method == "mac":
        m = BaselineEncoder("mac", weights="random", max_side=SIZE)
    else:
        m = BaselineEncoder("spoc", whiten=True, weights="random", max_side=SIZE)
    report = evaluate(bench, m, learn=[learn], cache_dir=cache)
    # Each query's two copies have the query's own vector: they are ranked first (query = junk).
    assert report.map == pytest.approx(1.0)
    assert report.top1 == 1.0
    assert len(report.per_query) == len(bench.queries) == 12
    assert all(q["ap"] == pytest.approx(1.0) for q in report.per_query)
    assert set(report.times) == {"extract", "fit", "encode", "search"}
    assert report.per_group and set(report.per_group) == {"obj00", "obj01", "obj02", "obj03"}
    if method == "mac":
        assert report.learning_set["n_images"] == 0 and report.dim == 512
        assert report.kept_fraction == 1.0
    else:
        assert report.learning_set["n_images"] == 10
        assert report.learning_set["name"] == "learn"
        assert report.times["fit"] > 0
    if method == "encoder":
        assert report.dim == 512
        assert 0 < report.kept_fraction <= 1
        assert report.learning_set["rotation_components"] == 9  # N - 1 of 640: completed basis
        assert any("completes the basis" in n for n in report.notes)
    if method == "spoc+pcaw":
        assert report.dim == 9  # whitening learns at most N - 1 = 9 components


def test_methods_that_learn_refuse_to_run_without_a_learning_set(dup_layout):
    objects, _, cache = dup_layout
    data = prepare(read_object_folders(objects), weights="random", max_side=SIZE, cache_dir=cache)
    with pytest.raises(ValueError, match="learning set"):
        run(data, BaselineEncoder("gem", whiten=True, weights="random", max_side=SIZE))
    with pytest.raises(ValueError, match="maps"):
        run(data, BaselineEncoder("gem", weights="random", max_side=96))


def test_a_fitted_encoder_runs_without_a_learning_set_and_says_so(dup_layout, tmp_path):
    objects, learn, cache = dup_layout
    config = EncoderConfig.from_preset("temb-demo-512", weights="random", max_side=SIZE, **FAST)
    learn_data = prepare(
        read_object_folders(objects),
        weights="random",
        max_side=SIZE,
        learn=[learn],
        cache_dir=cache,
    )
    path = Encoder(config).fit(learn_data.learn).save(tmp_path / "enc.npz")
    report = evaluate(read_object_folders(objects), Encoder.load(path), cache_dir=cache)
    assert report.map == pytest.approx(1.0)
    assert report.learning_set["disjoint_checked"] is False
    assert report.times["fit"] == 0.0


def test_query_crops_are_extracted_with_their_box(dup_layout):
    objects, _, cache = dup_layout
    full = read_object_folders(objects)
    q = full.queries[0]
    bench = RetrievalBenchmark(
        "crop", full.root, full.db_images,
        [Query("crop", q.image, bbox=(0, 0, 100, 80), positives=q.positives, image_index=q.image_index)],
    )  # fmt: skip
    data = prepare(bench, weights="random", max_side=SIZE, cache_dir=cache)
    # The crop is resized by the full image's factor 128/160: 80 x 64 px.
    assert data.queries[0].image_size == (64, 80)
    assert data.db[q.image_index].image_size == (96, 128)


def test_score_per_group_top1_and_ns_on_hand_made_rankings(tmp_path):
    # UKBench naming: 8 images, objects 0 and 1; queries are the database images in order.
    for i in range(8):
        save(tmp_path / f"ukbench{i:05d}.jpg", make_image(i, 64, 48))
    bench = read_ukbench(tmp_path)
    perfect = np.array([[g * 4 + (q + j) % 4 for j in range(4)] + [(1 - g) * 4 + j for j in range(4)]
                        for q, g in ((q, q // 4) for q in range(8))]).T  # fmt: skip
    s = score(bench, perfect)
    assert s["ns_score"] == 4.0 and s["map"] == pytest.approx(1.0) and s["top1"] == 1.0
    # Swap object 1's queries to rank the other object first: N-S drops to 2 (half the queries).
    worst = perfect.copy()
    worst[:, 4:] = np.roll(perfect[:, 4:], 4, axis=0)
    s = score(bench, worst)
    assert s["ns_score"] == pytest.approx(2.0)
    assert s["per_group"]["00000"]["top1"] == 1.0 and s["per_group"]["00001"]["top1"] == 0.0
    assert s["top1"] == 0.5


# --------------------------------------------------------------------------- smells fixed (issue 9)

# A revisited ground truth (easy / hard / junk, disjoint) and a ranking that favours easy, junk
# and hard images in that order. The expected figures were computed by the code that applied the
# protocol when loading (before issue 9), and must not change.
REVISITED_GND = [
    {"easy": [4, 0, 28, 20], "hard": [30, 10], "junk": [12, 32, 19]},
    {"easy": [33, 37, 32], "hard": [26], "junk": [27, 23]},
    {"easy": [36], "hard": [11, 0, 24], "junk": [37, 6, 34]},
    {"easy": [18, 24], "hard": [], "junk": [27, 32]},
    {"easy": [4, 19, 16, 0], "hard": [1, 9], "junk": [21, 23, 27]},
    {"easy": [10, 13, 26], "hard": [35], "junk": [23]},
]
REVISITED_BEFORE = {  # protocol: (mAP, mP@1/5/10, top-1)
    "easy": (0.6533174001924001, (0.8333333333333334, 0.4666666666666666, 0.4), 0.8333333333333334),
    "medium": (0.651202535371754, (1.0, 0.4666666666666666, 0.2833333333333333), 1.0),
    "hard": (0.20522186147186144, (0.2, 0.12, 0.1), 0.2),
}


def revisited_ranks() -> np.ndarray:
    scores = np.random.default_rng(3).random((40, 6))
    for q, g in enumerate(REVISITED_GND):
        scores[g["easy"], q] += 0.6
        scores[g["hard"], q] += 0.3
        scores[g["junk"], q] += 0.5
    return np.argsort(-scores, axis=0, kind="stable")


def test_revisited_protocol_is_applied_when_scoring_not_when_loading(tmp_path):
    path = tmp_path / "gnd_rrand.pkl"
    path.write_bytes(pickle.dumps({"imlist": [f"x{i}" for i in range(40)],
                                   "qimlist": [f"q{i}" for i in range(6)], "gnd": REVISITED_GND}))  # fmt: skip
    ranks = revisited_ranks()
    loaded = {p: read_gnd_pkl(path, protocol=p) for p in REVISITED_BEFORE}
    for protocol, bench in loaded.items():
        # Whatever the protocol, the queries hold the file's raw lists.
        assert bench.protocol == protocol and bench.queries == loaded["easy"].queries
        assert [(q.easy, q.hard, q.junk, q.positives) for q in bench.queries] == [
            (g["easy"], g["hard"], g["junk"], []) for g in REVISITED_GND
        ]
        s = score(bench, ranks)
        m, mp, top1 = REVISITED_BEFORE[protocol]
        assert s["map"] == pytest.approx(m, abs=1e-12) and s["top1"] == pytest.approx(top1)
        assert [s["mp_at_k"][k] for k in (1, 5, 10)] == pytest.approx(mp)
        assert s["revisited"] == pytest.approx({p: v[0] for p, v in REVISITED_BEFORE.items()})
        # Any protocol can be scored from any load: the raw lists are all there.
        other = score(loaded["easy"], ranks, protocol=protocol)
        assert other["map"] == pytest.approx(m, abs=1e-12)


def test_score_follows_the_declared_metric_not_the_dataset_name(tmp_path):
    for i in range(8):
        save(tmp_path / "phones" / f"ukbench{i:05d}.jpg", make_image(i, 64, 48))
    # UKBench-format ground truth under another name still gets its N-S score ...
    bench = dataclasses.replace(read_ukbench(tmp_path / "phones"), name="my-phones")
    ranks = np.array([[g * 4 + (q + j) % 4 for j in range(4)] + [(1 - g) * 4 + j for j in range(4)]
                      for q, g in ((q, q // 4) for q in range(8))]).T  # fmt: skip
    assert score(bench, ranks)["ns_score"] == 4.0
    assert score(dataclasses.replace(bench, protocol="loo"), ranks)["ns_score"] == 4.0
    # ... and a benchmark merely named "ukbench" that declares no N-S score gets none.
    objects = write_objects(tmp_path / "ukbench", n_objects=2, n_views=2)
    other = read_object_folders(objects)
    assert other.name == "ukbench" and other.metrics == ()
    assert score(other, np.tile(np.arange(4)[:, None], (1, 4)))["ns_score"] is None


def test_the_mask_is_computed_once_per_map_in_a_run(dup_layout, monkeypatch):
    from selret.encoding import masks

    objects, learn, cache = dup_layout
    data = prepare(
        read_object_folders(objects), weights="random", max_side=SIZE, learn=[learn],
        cache_dir=cache, preload=True,
    )  # fmt: skip
    # SUM-mask: on these small grids the MAX-mask keeps every cell.
    config = EncoderConfig.from_preset(
        "temb-demo-512", weights="random", max_side=SIZE, mask="sum", **FAST
    )
    encoder = Encoder(config).fit(data.learn)
    original = masks.compute_mask
    calls = []

    def counting(kind, fmap):
        calls.append(kind)
        return original(kind, fmap)

    for name, module in list(sys.modules.items()):
        if name.startswith("selret") and getattr(module, "compute_mask", None) is original:
            monkeypatch.setattr(module, "compute_mask", counting)
    report = run(data, encoder)
    assert len(calls) == len(data.db) + len(data.queries) == 24
    # The kept fraction the report gives comes from that one mask per map.
    expected = np.mean([original(config.mask, f).mean() for f in data.db])
    assert 0 < expected < 1 and report.kept_fraction == pytest.approx(expected)


# --------------------------------------------------------------------------- report files


def test_report_saves_json_and_markdown(dup_layout, tmp_path):
    objects, _, cache = dup_layout
    report = evaluate(
        read_object_folders(objects),
        BaselineEncoder("rmac", weights="random", max_side=SIZE),
        cache_dir=cache,
    )
    js, md = report.save(tmp_path / "out")
    data = json.loads(js.read_text())
    assert data["dataset"] == "objects" and data["map"] == pytest.approx(1.0) and data["dim"] == 512
    assert data["method"] == "rmac" and data["max_side"] == SIZE and data["weights"] == "random"
    assert len(data["per_query"]) == 12 and len(data["per_query"][0]["top"]) == 10
    text = md.read_text()
    assert "| mAP | 100.0 |" in text and "| obj02 | 3 | 100.0 | 100.0 |" in text


def test_report_files_are_written_atomically(dup_layout, tmp_path, monkeypatch):
    objects, _, cache = dup_layout
    report = evaluate(
        read_object_folders(objects), BaselineEncoder("mac", weights="random", max_side=SIZE),
        cache_dir=cache,
    )  # fmt: skip

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        report.save(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no partial report, no temporary file


def test_contact_sheet_frames_results_by_relevance(dup_layout, tmp_path):
    from PIL import Image

    from selret.evaluation.plots import NEGATIVE, POSITIVE, contact_sheet, with_border

    framed = with_border(np.zeros((4, 5, 3), np.uint8), POSITIVE, width=2)
    assert framed.shape == (8, 9, 3) and tuple(framed[0, 0]) == POSITIVE and framed[4, 4].sum() == 0
    objects, _, cache = dup_layout
    bench = read_object_folders(objects)
    report = evaluate(
        bench, BaselineEncoder("mac", weights="random", max_side=SIZE), cache_dir=cache
    )
    ranks = report.ranks.copy()
    ranks[1, 0] = 11  # a negative (object 3) at rank 2 of query 0
    png = contact_sheet(bench, ranks, tmp_path / "c.png", queries=[0], k=3, size=64)
    img = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in img[::7].tolist()}
    assert POSITIVE in colours and NEGATIVE in colours


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    import selret.cli
    import selret.cli.evaluate  # noqa: F401  (registers eval / experiment if __init__ does not yet)

    return CliRunner(), selret.cli.app


def test_cli_eval_end_to_end(tmp_path, cli):
    runner, app = cli
    objects = write_objects(tmp_path / "objects", n_objects=3, n_views=3, seed=7)
    learn = write_learning(tmp_path / "learn", n=8)
    out = tmp_path / "out"
    args = ["eval", str(objects), "--preset", "temb-demo-512", "--learn", str(learn), "--weights", "random",
            "--max-side", str(SIZE), "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress",
            "--contact-queries", "2", "--top-k", "3"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["map"] <= 1.0 and report["n_queries"] == 9 and report["dim"] == 512
    learning = report["learning_set"]
    assert (learning["name"], learning["n_images"], learning["disjoint_checked"]) == (
        "learn",
        8,
        True,
    )
    assert learning["rotation_components"] == 7  # N - 1 learning images
    assert "| mAP |" in result.output and (out / "report.md").is_file()
    from PIL import Image

    w, h = Image.open(out / "contact.png").size
    assert w > h > 0  # 2 rows of 1 + 3 thumbnails

    # The same folder as learning set is refused, naming the problem.
    bad = runner.invoke(app, args[:5] + [str(objects)] + args[6:])
    assert bad.exit_code == 2 and "learning set" in bad.output


def test_cli_eval_baseline_needs_learning_only_to_whiten(tmp_path, cli):
    runner, app = cli
    objects = write_objects(tmp_path / "objects", n_objects=3, n_views=2, duplicates=True)
    common = ["--weights", "random", "--max-side", "96", "--cache", str(tmp_path / "cache"), "--no-progress",
              "--contact-queries", "0"]  # fmt: skip
    ok = runner.invoke(
        app, ["eval", str(objects), "--baseline", "crow", "--out", str(tmp_path / "a"), *common]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "a" / "report.json").read_text())["map"] == pytest.approx(1.0)
    refused = runner.invoke(app, ["eval", str(objects), "--baseline", "crow", "--whiten", *common])
    assert refused.exit_code != 0 and "--learn" in refused.output
