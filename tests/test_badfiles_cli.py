"""Fuzz of the command line with the bad-file corpus (tests/badfiles.py), random weights, 64 px.

``selret extract`` runs as a real process on the corpus folder, on a list file naming every entry
(FIFO, folder and broken links included) and with ``--accept-damaged``; ``selret search`` takes
every corpus file as its query and the corpus folder as its database. The properties:

- no traceback, ever; a refused input is one ``error: ...`` line;
- good images are extracted (their maps are in the cache) or found;
- every other entry is named in the output and in the ``--log`` file with its reason: the error
  class the corpus expects, or the kind of skip the folder scan reports;
- exit codes as documented: ``extract`` fails (3, input) only when no image could be used; a bad
  query exits with its error class's code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from badfiles import BadFile, make_corpus
from typer.testing import CliRunner

import selret.errors
from selret.cli import app
from selret.errors import ExitCode
from selret.features.cache import FeatureCache

MAX_SIDE = 64
BACKBONE_ID = "random:pool5"
# Corpus entries whose decoded pixels are exactly those of "png-rgb" (the base image).
SAME_PIXELS_AS_PNG = {
    "png-rgb",
    "png-named-jpg",
    "space-name",
    "bmp",
    "ppm",
    "inside-linked-folder",
}
ENCODER = dict(weights="random", max_side=MAX_SIDE, d=16, k=10, kmeans_iters=5)


def selret_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``selret ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELRET_THREADS": "1"}
    env.pop(selret.files.CRASH_ENV, None)
    return subprocess.run(
        [sys.executable, "-c", "from selret.cli import main; main()", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and 'File "' not in text, text[-3000:]


def read_log(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["path"]: r for r in records}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[BadFile]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def extracted(corpus, tmp_path_factory):
    """``selret extract`` of the corpus folder (log, cache, process result)."""
    root = tmp_path_factory.mktemp("extract")
    log = root / "log.jsonl"
    result = selret_cli(
        "extract", corpus[0].path.parent, "--cache", root / "cache", "--weights", "random",
        "--max-side", MAX_SIDE, "--no-progress", "--log", log,
    )  # fmt: skip
    return {"root": root, "log": log, "result": result, "cache": FeatureCache(root / "cache")}


def test_extract_folder(corpus, extracted):
    result, cache = extracted["result"], extracted["cache"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_traceback(result.stdout, result.stderr)
    log = read_log(extracted["log"])
    for b in corpus:
        if b.skip is not None:  # reported by the scan, never read
            assert f"skipped: {b.path}: " in result.stderr, b.kind
            assert log[str(b.path)]["status"] == "skipped" and log[str(b.path)]["kind"] == b.skip
        elif b.good:
            assert cache.get(cache.key(b.path, BACKBONE_ID, MAX_SIDE)) is not None, b.kind
            assert str(b.path) not in log, b.kind
        else:
            assert f"failed: {b.path}: {b.expect}: " in result.stdout, b.kind
            record = log[str(b.path)]
            assert (record["status"], record["error"]) == ("failed", b.expect), b.kind
            assert record["reason"], b.kind
    n_listed = sum(b.skip is None for b in corpus)
    n_good = sum(b.good and b.skip is None for b in corpus)
    # The symlink and its target have the same content: one map, counted once as "cached".
    assert f"{n_listed} images: " in result.stdout
    assert f"{n_listed - n_good} failed" in result.stdout


def test_extract_list_file_then_accept_damaged(corpus, extracted, tmp_path):
    listing = tmp_path / "all.txt"
    listing.write_text("".join(f"{b.path}\n" for b in corpus), encoding="utf-8")
    cache_dir = extracted["root"] / "cache"  # the folder run's maps are reused
    common = ["--cache", cache_dir, "--weights", "random", "--max-side", MAX_SIDE, "--no-progress"]
    log = tmp_path / "log.jsonl"
    result = selret_cli("extract", listing, *common, "--log", log)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_traceback(result.stdout, result.stderr)
    records = read_log(log)
    cache = FeatureCache(cache_dir)
    for b in corpus:  # a list file names each entry: all are read, none skipped
        if b.good:
            assert cache.get(cache.key(b.path, BACKBONE_ID, MAX_SIDE)) is not None, b.kind
        else:
            assert f"failed: {b.path}: {b.expect}: " in result.stdout, b.kind
            assert records[str(b.path)]["error"] == b.expect, b.kind
    assert "skipped" not in {r["status"] for r in records.values()}

    log = tmp_path / "damaged.jsonl"
    result = selret_cli("extract", listing, *common, "--log", log, "--accept-damaged")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    records = read_log(log)
    for b in corpus:
        if b.damaged:
            assert f"damaged, used anyway: {b.path}: " in result.stdout, b.kind
            assert records[str(b.path)]["status"] == "damaged", b.kind
            fmap, damage = cache.get_entry(cache.key(b.path, BACKBONE_ID, MAX_SIDE))
            assert damage == records[str(b.path)]["reason"], b.kind
        elif not b.good:
            assert records[str(b.path)]["error"] == b.expect, b.kind
    # A strict run afterwards refuses the damaged images although their maps are cached.
    result = selret_cli("extract", listing, *common)
    for b in corpus:
        if b.damaged:
            assert f"failed: {b.path}: CorruptImageError: damaged image data" in result.stdout


def test_extract_exit_codes(corpus, tmp_path):
    bad_only = tmp_path / "bad-only"
    bad_only.mkdir()
    for b in corpus:
        if not b.good and b.data() is not None:
            (bad_only / b.path.name).write_bytes(b.data())
    common = ["--cache", tmp_path / "cache", "--weights", "random", "--max-side", MAX_SIDE]
    for source in (bad_only, tmp_path / "missing", tmp_path / "empty-folder"):
        if source.name == "empty-folder":
            source.mkdir()
        result = selret_cli("extract", source, *common, "--no-progress")
        assert result.returncode == ExitCode.INPUT, (source.name, result.stderr[-2000:])
        assert_no_traceback(result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and str(source) in errors[0], result.stderr


@pytest.fixture(scope="module")
def encoder_file(corpus, tmp_path_factory) -> Path:
    """An encoder fitted with random weights on the corpus's good images."""
    from selret.encoding.encoder import Encoder, EncoderConfig
    from selret.features.extractor import Extractor

    root = tmp_path_factory.mktemp("encoder")
    config = EncoderConfig(**ENCODER)
    learn = [b.path for b in corpus if b.good][:12]
    maps = Extractor.for_config(config, cache=root / "cache").maps(learn, progress=False)
    path = root / "enc.npz"
    Encoder(config).fit(maps).save(path)
    return path


def test_search_with_corpus_files_as_query(corpus, encoder_file, tmp_path):
    database = tmp_path / "db"
    database.mkdir()
    for b in corpus:
        if b.kind in ("jpeg-rgb", "png-rgb", "webp", "bmp"):
            (database / b.path.name).write_bytes(b.data())
    cache = encoder_file.parent / "cache"
    runner = CliRunner()
    # Every bad entry; of the good ones (all decoded in test_badfiles_io) one per format family,
    # as each query re-indexes the database (about 1 s with random weights).
    goods = {"jpeg-cmyk", "png-16bit", "gif-animated", "tiff-float", "exif-orientation-6",
             "unicode-name", "png-named-jpg", "dash-name", "symlink-good"}  # fmt: skip
    for b in corpus:
        if b.good and b.kind not in goods:
            continue
        r = runner.invoke(
            app,
            ["search", str(b.path), "--images", str(database), "-e", str(encoder_file),
             "--cache", str(cache), "--top", "2", "--json"],
        )  # fmt: skip
        assert r.exception is None or isinstance(r.exception, SystemExit), (b.kind, r.exception)
        assert_no_traceback(r.output)
        if b.good:
            assert r.exit_code == 0, (b.kind, r.output[-2000:])
            assert len(json.loads(r.stdout)["results"]) == 2, b.kind
        else:
            expected = getattr(selret.errors, b.expect).exit_code
            assert r.exit_code == expected, (b.kind, r.exit_code, r.output[-2000:])
            errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and str(b.path) in errors[0], (b.kind, r.stderr)


def test_search_over_the_corpus_folder(corpus, encoder_file):
    """The corpus folder as the database: good images found, the rest named with their reason."""
    query = next(b for b in corpus if b.kind == "png-rgb")
    result = selret_cli(
        "search", query.path, "--images", query.path.parent, "-e", encoder_file,
        "--cache", encoder_file.parent / "cache", "--top", "3", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_traceback(result.stdout, result.stderr)
    hits = json.loads(result.stdout)["results"]
    # The top hit has the query's pixels (several corpus files do: same PNG, BMP, PPM, renamed).
    # Not asserted: a score of 1 — an encoder fitted on 12 images amplifies float rounding.
    same_pixels = {b.path for b in corpus if b.good and b.kind in SAME_PIXELS_AS_PNG}
    assert Path(hits[0]["path"]) in same_pixels, hits
    output = result.stdout + result.stderr
    for b in corpus:
        if b.skip is None and not b.good:
            assert str(b.path) in output and b.expect in output, b.kind
        elif b.skip is not None:
            assert str(b.path) in output, b.kind
