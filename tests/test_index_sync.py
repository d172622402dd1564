"""An index that follows its files by content: sha256 in the catalog, `index add` re-encodes changed
files ("updated"), `index sync` drops deleted ones, `index verify` finds stale and missing
entries; concurrent writers merge instead of failing; `index build` is all or nothing.
Random weights, 96 px images."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from index_fixtures import assert_one_error, fit_encoder, make_images
from typer.testing import CliRunner

from selret.cli import app
from selret.errors import ExitCode, IndexLockTimeout, NoImagesError
from selret.files import file_stamp, sha256_of
from selret.search import storage
from selret.search.engine import SearchEngine, normalise_path
from selret.search.store import FILE_STAMP, ImageIndex
from selret.search.verify import verify_engine


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    cache = root / "cache"
    encoder = fit_encoder(make_images(root / "learn", 8, seed=1), cache)
    return {"root": root, "cache": cache, "encoder": encoder}


@pytest.fixture
def engine(setup, tmp_path):
    """A fresh engine holding tmp_path/db (6 images), and that folder."""
    db = make_images(tmp_path / "db", 6, seed=2)
    engine, report = SearchEngine.build(
        tmp_path / "eng", setup["encoder"], db, cache_dir=setup["cache"], progress=False
    )
    assert report.added == 6
    return engine, db


def key(path: Path) -> str:
    return normalise_path(path)


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


# ====================================================================== content tracking


def test_catalog_records_each_files_sha256(engine):
    eng, db = engine
    for path in db:
        assert eng.index.get(key(path)).sha256 == sha256_of(path)
    assert verify_engine(eng.root).consistent


def test_add_reencodes_a_changed_file_under_a_new_id(engine, tmp_path):
    eng, db = engine
    old = eng.index.get(key(db[1]))
    shutil.copyfile(make_images(tmp_path / "other", 1, seed=9)[0], db[1])  # new content
    report = eng.add_images(db, progress=False)
    assert (report.added, report.updated, report.skipped, report.failed) == (0, 1, 5, [])
    new = eng.index.get(key(db[1]))
    assert new.sha256 == sha256_of(db[1]) != old.sha256 and new.id > old.id
    assert len(eng.index) == 6
    top = eng.search_image(db[1], k=1)[0]  # the new content is what is found now
    assert (top.path, top.id) == (key(db[1]), new.id) and top.score == pytest.approx(1, abs=1e-4)
    reopened = SearchEngine.open(eng.root)
    assert reopened.index.get(key(db[1])).sha256 == sha256_of(db[1])


def test_files_with_their_recorded_stamp_are_not_read_again(engine, tmp_path):
    eng, db = engine
    assert eng.index.get(key(db[0])).metadata[FILE_STAMP] == file_stamp(db[0])
    report = eng.add_images(db, progress=False)
    assert (report.skipped, report.hashed, report.updated) == (6, 0, 0)
    # touched: same content, new mtime -> read and hashed, still unchanged
    st = db[0].stat()
    os.utime(db[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    report = eng.add_images(db, progress=False)
    assert (report.skipped, report.hashed, report.updated) == (6, 1, 0)
    # nothing else changed, so no save just to record the new stamp: it is hashed again ...
    assert eng.add_images(db, progress=False).hashed == 1
    # ... until the index is saved anyway (a new file here): then the new stamp is recorded
    extra = make_images(tmp_path / "more", 1, seed=11)
    report = eng.add_images(db + extra, progress=False)
    assert (report.added, report.hashed, report.skipped) == (1, 2, 6)
    assert SearchEngine.open(eng.root).add_images(db + extra, progress=False).hashed == 0


def test_rehash_finds_a_change_that_kept_size_mtime_and_inode(engine):
    eng, db = engine
    st = db[3].stat()
    data = bytearray(db[3].read_bytes())
    data[-3] ^= 0xFF  # inside the image data, same length: still decodes (or fails) as itself
    with open(db[3], "r+b") as fh:  # in place: same inode
        fh.write(bytes(data))
    os.utime(db[3], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_stamp(db[3]) == eng.index.get(key(db[3])).metadata[FILE_STAMP]
    assert eng.add_images(db, progress=False).skipped == 6  # the stamp says unchanged
    report = eng.add_images(db, progress=False, rehash=True)
    assert report.hashed == 6 and report.skipped + report.updated + report.removed == 6
    assert report.skipped == 5
    assert run("index", "verify", "--index", eng.root).exit_code == 0
    r = run("index", "add", db[0].parent, "--index", eng.root, "--rehash")
    assert r.exit_code == 0 and "updated 0" in r.stdout, r.output


def test_a_changed_file_that_no_longer_decodes_loses_its_stale_entry(engine):
    eng, db = engine
    db[2].write_bytes(b"\x89PNG\r\n\x1a\n not a png any more")
    report = eng.add_images(db, progress=False)
    assert (report.updated, report.removed, report.skipped) == (0, 1, 5)
    assert [p for p, _ in report.failed] == [key(db[2])]
    assert eng.index.missing([key(db[2])]) == [key(db[2])]


def test_sync_drops_deleted_files_under_its_folder_only(engine, tmp_path):
    eng, db = engine
    extra = make_images(tmp_path / "extra", 2, seed=3)
    assert eng.add_images(extra, progress=False).added == 2
    db[0].unlink()
    extra[0].unlink()  # outside the synced folder: its entry stays until that folder is synced
    new = make_images(tmp_path / "db", 1, seed=4, start=10)
    report = eng.sync_images(sorted((tmp_path / "db").glob("*.png")), folder=tmp_path / "db")
    assert (report.added, report.removed, report.skipped, report.updated) == (1, 1, 5, 0)
    assert eng.index.missing([key(db[0]), key(extra[0]), key(new[0])]) == [key(db[0])]
    found = verify_engine(eng.root)
    assert [p for p, _ in found.missing] == [key(extra[0])] and not found.stale


def test_sync_of_a_list_file_drops_listed_files_that_are_gone(engine, tmp_path):
    eng, db = engine
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in db[:3]))
    db[1].unlink()
    report = eng.sync_images([Path(p) for p in listing.read_text().split()])
    assert (report.removed, report.skipped, report.failed) == (1, 2, [])
    assert len(eng.index) == 5  # db[3:] are not in the list: left alone


def test_sync_of_an_empty_folder_removes_nothing(engine, tmp_path):
    eng, _ = engine
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesError):
        eng.sync_images([], folder=tmp_path / "empty")
    r = run("index", "sync", tmp_path / "empty", "--index", eng.root)
    assert_one_error(r.exit_code, r.stderr, ExitCode.INPUT, "no images found")
    assert len(SearchEngine.open(eng.root).index) == 6


def test_cli_add_sync_verify_report(engine, tmp_path):
    eng, db = engine
    r = run("index", "verify", "--index", eng.root)
    assert r.exit_code == 0 and "6 images, 6 vectors: 6 ok, 0 stale, 0 missing" in r.stdout
    shutil.copyfile(db[5], db[4])  # db[4] now has db[5]'s content
    db[3].unlink()
    r = run("index", "verify", eng.root)
    line = assert_one_error(r.exit_code, r.stderr, ExitCode.INDEX, "inconsistent")
    assert "1 stale" in line and "1 missing" in line and "hint: `selret index sync" in r.stderr
    assert f"stale: {key(db[4])}: sha256" in r.stdout
    assert f"missing: {key(db[3])}: file not found" in r.stdout
    data = json.loads(run("index", "verify", eng.root, "--json").stdout)
    assert (data["consistent"], len(data["stale"]), len(data["missing"])) == (False, 1, 1)

    r = run("index", "add", tmp_path / "db", "--index", eng.root)
    assert r.exit_code == 0, r.output
    assert "added 0, updated 1, unchanged 4, removed 0, failed 0" in r.stdout
    r = run("index", "sync", tmp_path / "db", "--index", eng.root)
    assert "added 0, updated 0, unchanged 5, removed 1, failed 0" in r.stdout
    r = run("index", "verify", "--index", eng.root)
    assert r.exit_code == 0 and "5 images, 5 vectors: 5 ok" in r.stdout, r.output


def test_verify_finds_an_encoder_that_is_not_the_indexs(engine, setup, tmp_path):
    eng, _ = engine
    fit_encoder(make_images(tmp_path / "l2", 8, seed=5), setup["cache"], seed=3).save(
        eng.root / "encoder.npz"
    )
    r = run("index", "verify", eng.root)
    assert_one_error(r.exit_code, r.stderr, ExitCode.INDEX, "inconsistent", "index built by")
    assert "mismatch: index built by encoder" in r.stdout and "--force" in r.stderr


def test_verify_finds_vectors_and_catalog_that_disagree(engine, tmp_path):
    eng, db = engine
    index_dir = eng.root / "index"
    state = index_dir / eng.index.state
    other = SearchEngine.build(tmp_path / "e2", eng.encoder, db[:2], cache_dir=eng.cache_dir)[0]
    shutil.copyfile(
        other.root / "index" / other.index.state / "vectors.faiss", state / "vectors.faiss"
    )
    r = run("index", "verify", eng.root)
    assert_one_error(r.exit_code, r.stderr, ExitCode.INDEX, "catalog (6 images) and vectors (2")


def test_an_index_of_format_1_is_read_and_migrated(engine):
    eng, db = engine
    state = eng.root / "index" / eng.index.state
    # What selret wrote before the sha256 column existed.
    db_file = state / "catalog.sqlite"
    con = sqlite3.connect(db_file)
    con.execute("ALTER TABLE images DROP COLUMN sha256")
    con.commit()
    con.close()
    manifest = json.loads((state / "manifest.json").read_text())
    (state / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))

    old = SearchEngine.open(eng.root)
    assert len(old.index) == 6 and old.index.get(key(db[0])).sha256 is None
    found = verify_engine(eng.root)
    assert len(found.unrecorded) == 6 and not found.consistent
    report = old.add_images(db, progress=False)  # unknown content: re-encoded once
    assert (report.updated, report.added, report.skipped) == (6, 0, 0)
    assert verify_engine(eng.root).consistent
    manifest = json.loads((eng.root / "index" / old.index.state / "manifest.json").read_text())
    assert manifest["format_version"] == storage.FORMAT_VERSION == 2
    assert old.add_images(db, progress=False).skipped == 6


# ====================================================================== concurrent writers


def test_a_writer_that_opened_an_older_state_merges_instead_of_failing(engine, tmp_path):
    eng, _ = engine
    first, second = SearchEngine.open(eng.root), SearchEngine.open(eng.root)  # same state
    a = make_images(tmp_path / "a", 2, seed=6)
    b = make_images(tmp_path / "b", 3, seed=7, start=20)
    assert first.add_images(a, progress=False).added == 2
    report = second.add_images(b + a, progress=False)  # a: done by the first writer meanwhile
    assert (report.added, report.skipped) == (3, 2)
    final = SearchEngine.open(eng.root)
    assert len(final.index) == 11 and final.index.missing([key(p) for p in a + b]) == []
    assert verify_engine(eng.root).consistent


def test_writers_in_parallel_threads_all_land(engine, tmp_path):
    eng, _ = engine
    folders = [make_images(tmp_path / f"t{i}", 2, seed=30 + i, start=10 * i) for i in range(3)]
    handles = [SearchEngine.open(eng.root, cache_dir=eng.cache_dir) for _ in folders]
    results, start = {}, threading.Barrier(len(folders))

    def write(i):
        start.wait()
        results[i] = handles[i].add_images(folders[i], progress=False, lock_timeout=60)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(folders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i].added for i in range(3)] == [2, 2, 2]
    final = SearchEngine.open(eng.root)
    assert len(final.index) == 12
    assert verify_engine(eng.root).consistent
    assert len(list((eng.root / "index").glob("state-*"))) == 1


def test_a_second_writer_waits_for_the_lock_then_lands(engine, tmp_path):
    eng, _ = engine
    new = make_images(tmp_path / "new", 2, seed=8, start=30)
    with storage.writer_lock(eng.root / "index"):
        with pytest.raises(IndexLockTimeout, match=f"pid {os.getpid()}"):
            eng.add_images(new, progress=False, lock_timeout=0.3)
    assert len(SearchEngine.open(eng.root).index) == 6  # nothing half-done

    # The holder lets go only once the writer is waiting (told through on_wait): no timing.
    waiting, holding = threading.Event(), threading.Event()

    def hold_until_someone_waits():
        with storage.writer_lock(eng.root / "index"):
            holding.set()
            assert waiting.wait(60)
            time.sleep(0.2)

    holder = threading.Thread(target=hold_until_someone_waits)
    holder.start()
    holding.wait()
    holders = []
    report = eng.add_images(
        new, progress=False, lock_timeout=60, on_wait=lambda h: (holders.append(h), waiting.set())
    )
    holder.join()
    assert holders == [f"pid {os.getpid()}"] and report.added == 2
    assert len(SearchEngine.open(eng.root).index) == 8 and verify_engine(eng.root).consistent


def test_lock_timeout_is_one_error_line(engine, tmp_path):
    eng, _ = engine
    make_images(tmp_path / "new", 1, seed=8, start=30)
    with storage.writer_lock(eng.root / "index"):
        r = run("index", "add", tmp_path / "new", "--index", eng.root, "--lock-timeout", "0.2")
    assert_one_error(r.exit_code, r.stderr, ExitCode.INDEX, "locked by another writer", "0.2 s")
    assert f"waiting for another writer (pid {os.getpid()}) to finish" in r.stderr
    assert "hint: retry" in r.stderr
    assert len(SearchEngine.open(eng.root).index) == 6


# ====================================================================== build: all or nothing


def leftovers_next_to(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_build_of_an_empty_or_all_bad_folder_leaves_nothing(setup, tmp_path):
    enc = tmp_path / "enc.npz"
    setup["encoder"].save(enc)
    (tmp_path / "empty").mkdir()
    r = run("index", "build", tmp_path / "empty", "--index", tmp_path / "eng", "-e", enc)
    assert_one_error(r.exit_code, r.stderr, ExitCode.INPUT, "no images found")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "bad" / "b.png").write_bytes(b"")
    r = run("index", "build", tmp_path / "bad", "--index", tmp_path / "eng", "-e", enc)
    assert_one_error(r.exit_code, r.stderr, ExitCode.INPUT, "no image could be indexed (2 failed)")
    assert "failed" in r.stderr and "EmptyImageError" in r.stderr
    assert not (tmp_path / "eng").exists() and leftovers_next_to(tmp_path / "eng") == []
    make_images(tmp_path / "good", 2, seed=2)
    r = run("index", "build", tmp_path / "good", "--index", tmp_path / "eng", "-e", enc)
    assert r.exit_code == 0 and "added 2" in r.stdout, r.output


def test_build_over_an_index_refuses_unless_forced(engine, setup, tmp_path):
    eng, db = engine
    enc = tmp_path / "enc.npz"
    setup["encoder"].save(enc)
    before = sorted(os.listdir(eng.root / "index"))
    r = run("index", "build", tmp_path / "db", "--index", eng.root, "-e", enc)
    assert_one_error(r.exit_code, r.stderr, ExitCode.INDEX, "already holds a selret index")
    assert "hint: add images to it with `selret index add" in r.stderr and "--force" in r.stderr
    assert sorted(os.listdir(eng.root / "index")) == before
    (tmp_path / "two").mkdir()
    for p in db[:2]:
        shutil.copy(p, tmp_path / "two")
    r = run("index", "build", tmp_path / "two", "--index", eng.root, "-e", enc, "--force")
    assert r.exit_code == 0, r.output
    rebuilt = SearchEngine.open(eng.root)
    assert len(rebuilt.index) == 2 and leftovers_next_to(eng.root) == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = run("index", "build", tmp_path / "two", "--index", tmp_path / "other", "-e", enc)
    assert_one_error(r.exit_code, r.stderr, ExitCode.INDEX, "neither empty nor a selret index")


def test_image_index_updating_catches_up_and_clears_leftovers(engine):
    eng, _ = engine
    root = eng.root / "index"
    a, b = ImageIndex.open(root), ImageIndex.open(root)
    with a.updating():
        a.remove([1])
    (root / "state-999999").mkdir()  # as an interrupted save leaves it
    with b.updating() as live:  # b read the state before a's save: it catches up first
        assert len(live) == 5
    assert sorted(p.name for p in root.glob("state-*")) == [b.state]
