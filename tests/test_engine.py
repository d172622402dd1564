"""SearchEngine and the index/search/fit/encode CLI, end to end on generated images (random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from index_fixtures import ENCODER_CONFIG, make_images
from typer.testing import CliRunner

from selret.cli import app
from selret.encoding.encoder import Encoder, EncoderConfig
from selret.errors import ConfigMismatchError
from selret.features.extractor import Extractor
from selret.search.engine import SearchEngine

CONFIG = ENCODER_CONFIG


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    learn = make_images(root / "learn", 8, seed=1)
    db = make_images(root / "db", 6, seed=2)
    cache = root / "cache"
    config = EncoderConfig(**CONFIG)
    encoder = Encoder(config).fit(
        Extractor.for_config(config, cache=cache).maps(learn, progress=False)
    )
    return {"root": root, "learn": learn, "db": db, "cache": cache, "encoder": encoder}


def test_engine_index_search_incremental_remove_reopen(workspace):
    w = workspace
    engine = SearchEngine.create(w["root"] / "eng1", w["encoder"], cache_dir=w["cache"])
    report = engine.add_images(w["db"][:4], progress=False)
    assert (report.added, report.skipped, report.failed) == (4, 0, [])
    report = engine.add_images(w["db"], progress=False)  # incremental: 4 skipped, 2 new
    assert (report.added, report.skipped) == (2, 4)
    for path in w["db"]:
        top = engine.search_image(path, k=3)
        assert Path(top[0].path) == path.resolve()
        assert top[0].score == pytest.approx(1.0, abs=1e-4)
        assert top[0].score >= top[1].score >= top[2].score
    # image bytes give the same answer as the file
    assert engine.search_image(w["db"][2].read_bytes(), k=1)[0].path == str(w["db"][2].resolve())
    assert engine.remove_images([w["db"][0]]) == 1
    reopened = SearchEngine.open(w["root"] / "eng1", cache_dir=w["cache"])
    assert len(reopened.index) == 5
    assert all(h.path != str(w["db"][0].resolve()) for h in reopened.search_image(w["db"][0], k=5))


def test_engine_reports_bad_files_and_keeps_going(workspace, tmp_path):
    w = workspace
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    engine = SearchEngine.create(tmp_path / "eng", w["encoder"], cache_dir=w["cache"])
    report = engine.add_images([bad, *w["db"][:2], empty], progress=False)
    assert report.added == 2
    reasons = dict(report.failed)
    assert set(reasons) == {str(bad.resolve()), str(empty.resolve())}
    assert "EmptyImageError" in reasons[str(empty.resolve())]


def test_engine_refuses_other_encoder(workspace, tmp_path):
    w = workspace
    SearchEngine.create(tmp_path / "eng", w["encoder"], cache_dir=w["cache"])
    other = Encoder(EncoderConfig(**CONFIG, seed=5)).fit(
        Extractor.for_config(EncoderConfig(**CONFIG, seed=5), cache=w["cache"]).maps(
            w["learn"], progress=False
        )
    )
    other.save(tmp_path / "eng" / "encoder.npz")  # swap the encoder behind the index's back
    with pytest.raises(ConfigMismatchError):
        SearchEngine.open(tmp_path / "eng")
    with pytest.raises(FileExistsError):
        SearchEngine.create(tmp_path / "eng", w["encoder"])
    with pytest.raises(FileNotFoundError, match="not a selret index"):
        SearchEngine.open(tmp_path / "nothing-here")


def test_cli_fit_encode_index_search(workspace, tmp_path):
    w = workspace
    runner = CliRunner()
    cache = ["--cache", str(w["cache"])]
    enc = tmp_path / "enc.npz"
    r = runner.invoke(
        app,
        [
            "fit",
            str(w["root"] / "learn"),
            "-o",
            str(enc),
            "--weights",
            "random",
            "--max-side",
            "96",
            "--d",
            "16",
            "--k",
            "10",
            "--mask",
            "sum",
            *cache,
        ],
    )
    assert r.exit_code == 0, r.output
    assert "D=32" in r.output and enc.is_file()
    # The file says how it was made: command, learning-set manifest, fingerprint.
    fitted = Encoder.load(enc)
    prov = fitted.provenance_
    assert prov["fit_command"].startswith("selret fit ") and "--mask sum" in prov["fit_command"]
    assert prov["learning_set"]["n_images"] == len(prov["learning_set"]["files"]) > 0
    assert prov["fingerprint"] == fitted.fingerprint and prov["dim"] == 32

    vecs = tmp_path / "vecs.npz"
    r = runner.invoke(
        app, ["encode", str(w["root"] / "db"), "-e", str(enc), "-o", str(vecs), *cache]
    )
    assert r.exit_code == 0, r.output
    data = np.load(vecs)
    assert data["vectors"].shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(data["vectors"], axis=1), 1, atol=1e-5)

    eng = tmp_path / "eng"
    r = runner.invoke(
        app, ["index", "build", str(eng), str(w["root"] / "db"), "-e", str(enc), *cache]
    )
    assert r.exit_code == 0, r.output
    assert "added 6" in r.output
    r = runner.invoke(app, ["index", "add", str(eng), str(w["root"] / "db"), *cache])
    assert "added 0, updated 0, unchanged 6" in r.output
    r = runner.invoke(app, ["index", "info", str(eng), "--json"])
    info = json.loads(r.output)
    assert info["count"] == 6 and info["dim"] == 32

    query = w["db"][3]
    r = runner.invoke(app, ["search", str(query), "--index", str(eng), "--top", "3", "--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.output)["results"]
    assert len(results) == 3 and results[0]["path"] == str(query.resolve())
    r = runner.invoke(app, ["search", str(query), "--index", str(eng), "--bbox", "0,0,48,36"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split() == ["rank", "score", "path"]
    r = runner.invoke(app, ["search", str(query), "--index", str(eng), "--bbox", "1,2,3"])
    assert r.exit_code != 0 and "four comma-separated numbers" in r.output
    r = runner.invoke(app, ["search", str(query), "--index", str(eng), "--bbox", "500,500,600,600"])
    assert r.exit_code == 2 and "error:" in r.output
    r = runner.invoke(app, ["index", "remove", str(eng), str(query)])
    assert "removed 1; 5 images left" in r.output


def test_demo_dataset_is_consistent(tmp_path):
    pytest.importorskip("skimage")
    from selret.evaluation.demo_data import (
        DB_VARIANTS,
        LEARNING,
        OBJECTS,
        build_demo_dataset,
        learning_images,
    )

    bench = build_demo_dataset(tmp_path / "demo")
    assert len(bench.db_images) == len(OBJECTS) * len(DB_VARIANTS)
    assert len(bench.queries) == len(OBJECTS) + 1  # + the real right view of the motorcycle
    learn = learning_images(tmp_path / "demo")
    assert len(learn) == len(LEARNING) and all(p.is_file() for p in learn)
    used = {bench.image_path(i).resolve() for i in range(len(bench.db_images))}
    used |= {bench.query_path(q).resolve() for q in bench.queries}
    assert used.isdisjoint({p.resolve() for p in learn})  # held-out learning set
    for q in bench.queries:
        assert len(q.positives) == len(DB_VARIANTS)
        assert all(Path(bench.db_images[i]).name.startswith(q.category + "__") for i in q.positives)
    again = build_demo_dataset(tmp_path / "demo")  # idempotent
    assert again.db_images == bench.db_images


def test_catalog_keeps_original_image_size(workspace, tmp_path):
    w = workspace
    engine = SearchEngine.create(tmp_path / "eng", w["encoder"], cache_dir=w["cache"])
    engine.add_images(w["db"][:1], progress=False)
    record = engine.index.get(str(w["db"][0].resolve()))
    assert (record.height, record.width) == (72, 96)  # not the network-input size
