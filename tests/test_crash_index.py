"""Crash injection: `selret index add` and `selret index build` are killed (SIGKILL, through the
``SELRET_CRASH_AT`` hooks of selret.files.crash_point, not sleeps) at each point of their save
path, then rerun. Whatever the point, the index opens, the rerun finishes the work, `index verify`
passes, every image is indexed exactly once with its current content, and no leftover of the
killed run remains. Random weights, 96 px images."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from index_fixtures import fit_encoder, make_images, selret_process
from typer.testing import CliRunner

from selret.cli import app
from selret.files import CRASH_ENV, sha256_of
from selret.search.engine import SearchEngine, normalise_path
from selret.search.verify import verify_engine

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    cache = root / "cache"
    encoder = fit_encoder(make_images(root / "learn", 8, seed=1), cache)
    encoder.save(root / "enc.npz")
    db = make_images(root / "db", 6, seed=2)
    replacement = make_images(root / "replacement", 1, seed=3)[0]
    # Warm the feature cache (maps are keyed by content), so the killed processes do not extract.
    SearchEngine.temporary(encoder, cache_dir=cache).add_images([*db, replacement], progress=False)
    return {"root": root, "cache": cache, "encoder": encoder, "db": db, "new": replacement}


@pytest.fixture(autouse=True)
def feature_cache(ws, monkeypatch):
    monkeypatch.setenv("SELRET_CACHE", str(ws["cache"]))


def killed_at(point: str, *args) -> None:
    run = selret_process(*args, env={CRASH_ENV: f"{point}:1"})
    assert run.returncode == KILLED, (point, run.returncode, run.stderr[-2000:])


def state_dirs(engine_dir: Path) -> list[str]:
    return sorted(p.name for p in (engine_dir / "index").glob("state-*"))


def assert_complete(engine_dir: Path, images: list[Path]) -> None:
    """The index holds each image exactly once, with its current content, and nothing else."""
    found = verify_engine(engine_dir)
    assert found.consistent and found.leftovers == [], found.as_dict()
    engine = SearchEngine.open(engine_dir)
    entries = engine.index.entries()
    assert sorted(p for _, p, _ in entries) == sorted(normalise_path(p) for p in images)
    for _, path, sha in entries:
        assert sha == sha256_of(path)
        top = engine.search_image(path, k=1)[0]
        assert top.path == path and top.score == pytest.approx(1, abs=1e-4)
    assert sorted(os.listdir(engine_dir / "index")) == ["CURRENT", "LOCK", engine.index.state]


@pytest.mark.parametrize("point", ["index.encoded", "index.state_written", "index.committed"])
def test_index_add_killed_then_rerun(ws, tmp_path, point):
    (tmp_path / "db").mkdir()
    db = [Path(shutil.copy(p, tmp_path / "db")) for p in ws["db"]]
    eng = tmp_path / "eng"
    SearchEngine.build(eng, ws["encoder"], db[:3], cache_dir=ws["cache"], progress=False)
    before = state_dirs(eng)
    shutil.copyfile(ws["new"], db[0])  # one indexed file changes: the add updates it

    killed_at(point, "index", "add", tmp_path / "db", "--index", eng)

    reopened = SearchEngine.open(eng)  # whatever the point, the live state is whole
    after = state_dirs(eng)
    if point == "index.encoded":  # nothing written yet
        assert after == before and len(reopened.index) == 3
    elif point == "index.state_written":  # the new state is written, not live
        assert len(after) == 2 and after[0] == before[0] and len(reopened.index) == 3
        assert verify_engine(eng).leftovers == [after[1]]
    else:  # live, the old state not deleted yet
        assert len(after) == 2 and reopened.index.state == after[1] and len(reopened.index) == 6
        assert verify_engine(eng).leftovers == [after[0]]
    if point != "index.committed":
        stale = verify_engine(eng).stale
        assert [p for p, _ in stale] == [normalise_path(db[0])]

    rerun = CliRunner().invoke(app, ["index", "add", str(tmp_path / "db"), "--index", str(eng)])
    assert rerun.exit_code == 0, rerun.output
    expected = (
        "added 0, updated 0, unchanged 6" if point == "index.committed" else "added 3, updated 1"
    )
    assert expected in rerun.stdout
    assert_complete(eng, db)


def test_index_build_killed_leaves_no_index_then_rebuilds(ws, tmp_path):
    eng = tmp_path / "eng"
    args = ("index", "build", ws["root"] / "db", "--index", eng, "-e", ws["root"] / "enc.npz")
    killed_at("index.encoded", *args)
    assert not eng.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".eng.building-")]
    assert len(leftovers) == 1  # the dead build's folder, never taken for an index
    rebuilt = CliRunner().invoke(app, [str(a) for a in args])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".eng.")] == []
    assert_complete(eng, ws["db"])
