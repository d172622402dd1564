"""Every expected failure of a command is one ``error: <what>: <why>`` line (plus ``hint:`` where
there is one) on stderr, no traceback, and the exit code of the table in docs/CLI.md
(selret.errors.ExitCode); ``selret --debug`` shows the traceback instead.
Random weights, 96 px images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from index_fixtures import assert_one_error, fit_encoder, make_images, selret_process
from typer.testing import CliRunner

from selret.cli import app
from selret.cli._errors import describe, report
from selret.errors import ExitCode, IndexConflictError
from selret.search.engine import SearchEngine
from selret.search.store import ImageIndex


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """An encoder file, a second encoder of another config, an engine of 4 images, a bad image."""
    root = tmp_path_factory.mktemp("errors")
    cache = root / "cache"
    learn = make_images(root / "learn", 8, seed=1)
    db = make_images(root / "db", 4, seed=2)
    encoder = fit_encoder(learn, cache)
    encoder.save(root / "enc.npz")
    fit_encoder(learn, cache, seed=7).save(root / "other.npz")
    SearchEngine.build(root / "eng", encoder, db, cache_dir=cache, progress=False)
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a folder")
    return {"root": root, "cache": cache, "db": db}


@pytest.fixture(autouse=True)
def feature_cache(ws, monkeypatch):
    monkeypatch.setenv("SELRET_CACHE", str(ws["cache"]))  # never the user's ~/.cache


@pytest.fixture
def eng(ws, tmp_path) -> Path:
    """A copy of the workspace's engine, free to damage."""
    return Path(shutil.copytree(ws["root"] / "eng", tmp_path / "eng"))


def check(args, code: ExitCode, *words: str) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return assert_one_error(r.exit_code, r.stderr, code, *words)


# ---------------------------------------------------------------------- index errors (4)


def test_missing_index(ws):
    r = ws["root"]
    for args in (
        ["index", "add", r / "db", "--index", r / "nowhere"],
        ["index", "info", r / "nowhere"],
        ["index", "verify", "--index", r / "nowhere"],
        ["index", "remove", r / "nowhere", "1"],
        ["search", r / "db" / "img00.png", "--index", r / "nowhere"],
    ):
        check(args, ExitCode.INDEX, "nowhere: not a selret index")


def test_corrupt_index_state(ws, eng):
    state = eng / "index" / (eng / "index" / "CURRENT").read_text().strip()
    (state / "manifest.json").write_text("{ truncated")
    check(["index", "info", eng], ExitCode.INDEX, "manifest.json: not valid JSON")
    check(["index", "add", ws["root"] / "db", "--index", eng], ExitCode.INDEX, "not valid JSON")


def test_build_over_an_existing_index(ws):
    r = ws["root"]
    line = check(
        ["index", "build", r / "db", "--index", r / "eng", "-e", r / "enc.npz"],
        ExitCode.INDEX,
        "already holds a selret index",
    )
    assert str(r / "eng") in line


def test_index_conflict_of_the_raw_api_reports_as_an_index_error(tmp_path, capsys):
    # No command raises it any more (writers merge under the lock); the raw API still does.
    dim = 4
    ImageIndex.create(tmp_path / "idx", dim, {"d": dim}, "fp")
    first, second = ImageIndex.open(tmp_path / "idx"), ImageIndex.open(tmp_path / "idx")
    first.add(["/a.jpg"], np.eye(dim, dtype=np.float32)[:1])
    first.save()
    second.add(["/b.jpg"], np.eye(dim, dtype=np.float32)[1:2])
    with pytest.raises(IndexConflictError) as err:
        second.save()
    assert report(err.value) == ExitCode.INDEX
    assert_one_error(ExitCode.INDEX, capsys.readouterr().err, ExitCode.INDEX, "another writer")


# ---------------------------------------------------------------------- encoder errors (6)


def test_truncated_encoder_file(ws, eng):
    data = (eng / "encoder.npz").read_bytes()
    (eng / "encoder.npz").write_bytes(data[: len(data) // 3])
    check(["index", "add", ws["root"] / "db", "--index", eng], ExitCode.ENCODER, "encoder.npz")
    check(["search", ws["db"][0], "--index", eng], ExitCode.ENCODER, "not a selret encoder file")
    check(["index", "verify", eng], ExitCode.ENCODER, "encoder.npz")


def test_garbled_encoder_file(ws, eng):
    data = bytearray((eng / "encoder.npz").read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(data) // 10, len(data), 64):
        data[i] ^= 0xFF
    (eng / "encoder.npz").write_bytes(bytes(data))
    check(["index", "info", eng], ExitCode.ENCODER, "encoder.npz")


def test_unknown_encoder_name_or_missing_file(ws, tmp_path):
    r = ws["root"]
    check(
        ["index", "build", r / "db", "--index", tmp_path / "new", "-e", "no-such-encoder"],
        ExitCode.ENCODER,
        "'no-such-encoder' is neither an encoder file nor a pre-trained encoder",
    )
    assert not (tmp_path / "new").exists()
    check(["encode", r / "db", "-e", tmp_path / "nope.npz"], ExitCode.ENCODER, "nope.npz")


# ---------------------------------------------------------------------- config mismatch (5)


def test_encoder_of_another_config(ws, eng):
    shutil.copyfile(ws["root"] / "other.npz", eng / "encoder.npz")
    for args in (
        ["index", "add", ws["root"] / "db", "--index", eng],
        ["index", "info", eng],
        ["search", ws["db"][0], "--index", eng],
    ):
        check(args, ExitCode.MISMATCH, "index was built with encoder fingerprint")


# ---------------------------------------------------------------------- input errors (3)


def test_missing_folders_and_files(ws, tmp_path):
    r = ws["root"]
    check(["index", "add", tmp_path / "gone", "--index", r / "eng"], ExitCode.INPUT, "gone")
    check(["search", tmp_path / "gone.png", "--index", r / "eng"], ExitCode.INPUT, "gone.png")
    check(["fit", tmp_path / "gone", "-o", tmp_path / "e.npz"], ExitCode.INPUT, "gone")
    check(["encode", r / "empty", "-e", r / "enc.npz"], ExitCode.INPUT, "no images found")
    check(["fit", r / "empty", "-o", tmp_path / "e.npz"], ExitCode.INPUT, "no images found")
    check(
        ["index", "build", r / "empty", "--index", tmp_path / "x", "-e", r / "enc.npz"],
        ExitCode.INPUT,
        "no images found",
    )


def test_unreadable_query_image(ws):
    r = ws["root"]
    check(["search", r / "garbage.jpg", "--index", r / "eng"], ExitCode.INPUT, "garbage.jpg")


def test_os_errors_on_user_paths(ws, tmp_path):
    r = ws["root"]
    # A file where a folder is needed: the OS refuses, the message names the path.
    check(
        ["encode", r / "db", "-e", r / "enc.npz", "-o", r / "notes.txt" / "v.npz"],
        ExitCode.INPUT,
        "notes.txt",
    )
    check(["index", "info", r / "notes.txt"], ExitCode.INDEX, "not a selret index")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(ws, tmp_path):
    locked = tmp_path / "locked"
    shutil.copytree(ws["root"] / "db", locked)
    locked.chmod(0)
    try:
        check(["index", "add", locked, "--index", ws["root"] / "eng"], ExitCode.INPUT, "locked")
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------- usage (2), other (1)


def test_box_outside_the_query_is_a_usage_error(ws):
    r = ws["root"]
    check(
        ["search", ws["db"][0], "--index", r / "eng", "--bbox", "500,500,600,600"], ExitCode.USAGE
    )


def test_unexpected_errors_are_one_line_with_a_hint_to_debug():
    message, hint, code = describe(RuntimeError("boom\nsecond line"))
    assert (message, code) == ("unexpected RuntimeError: boom second line", ExitCode.ERROR)
    assert "--debug" in hint
    assert describe(PermissionError(13, "Permission denied", "/x/y"))[::2] == (
        "/x/y: Permission denied",
        ExitCode.INPUT,
    )


# ---------------------------------------------------------------------- --debug, as a process


def test_debug_shows_the_traceback_and_plain_runs_do_not(ws):
    nowhere = ws["root"] / "nowhere"
    plain = selret_process("index", "info", nowhere)
    assert_one_error(plain.returncode, plain.stderr, ExitCode.INDEX, "not a selret index")
    assert plain.stdout == ""
    for debug in (["--debug"], []):
        env = {} if debug else {"SELRET_DEBUG": "1"}
        run = selret_process(*debug, "index", "info", nowhere, env=env)
        assert run.returncode == 1 and "Traceback" in run.stderr
        assert "NotAnIndexError" in run.stderr
