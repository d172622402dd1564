"""Shipped pre-trained encoders: integrity (sha256), provenance header, names wherever an encoder
is asked, and the default path for someone with only photos."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import data_dir, requires_weights
from typer.testing import CliRunner

from selret.cli import app
from selret.encoding import pretrained
from selret.encoding.encoder import Encoder
from selret.encoding.persistence import EncoderFileError, read_header
from selret.encoding.pretrained import (
    UnknownEncoderError,
    available,
    default_name,
    load_pretrained,
    pretrained_path,
    resolve_encoder,
)
from selret.features import FeatureMap

SHIPPED = {i.name: i for i in available()}


def test_the_promised_encoders_are_shipped_within_the_size_budget():
    assert {"landmarks-max-512", "landmarks-max-1024"} <= set(SHIPPED)
    assert default_name() in SHIPPED
    total = sum(pretrained_path(n).stat().st_size for n in SHIPPED)
    assert total <= 25e6, f"{total / 1e6:.1f} MB of package data"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_encoder_loads_with_its_provenance(name):
    info = SHIPPED[name]
    enc = Encoder.pretrained(name)
    assert enc.dim == info.dim and enc.config.mask == info.mask
    prov = read_header(pretrained_path(name))["provenance"]
    assert prov["fingerprint"] == enc.fingerprint  # the header describes exactly this encoder
    assert prov["dim"] == enc.dim and prov["mask"] == enc.config.mask
    assert (
        prov["fit_command"].startswith("selret fit ") and "landmarks-learn" in prov["fit_command"]
    )
    assert prov["selret_version"]
    files = prov["learning_set"]["files"]
    assert len(files) == enc.n_train_images_ == prov["learning_set"]["n_images"]
    assert all(len(sha) == 64 for _, sha in files)
    assert not any("paris" in f.lower() for f, _ in files)


def test_encoding_with_a_pretrained_encoder_gives_unit_vectors():
    enc = load_pretrained(default_name())
    rng = np.random.default_rng(0)
    fmap = FeatureMap(np.maximum(rng.normal(size=(512, 24, 32)), 0).astype(np.float32), (768, 1024))
    v = enc.encode(fmap)
    assert v.shape == (enc.dim,) and v.dtype == np.float32
    assert abs(float(np.linalg.norm(v)) - 1) < 1e-5


def test_a_tampered_file_is_refused(tmp_path, monkeypatch):
    name = default_name()
    copy = tmp_path / "pretrained_encoders"
    shutil.copytree(pretrained_path(name).parent, copy)
    data = bytearray((copy / SHIPPED[name].file).read_bytes())
    data[-100] ^= 0xFF
    (copy / SHIPPED[name].file).write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "_folder", lambda: copy)
    with pytest.raises(EncoderFileError, match="sha256"):
        load_pretrained(name)


def test_names_and_paths_resolve(tmp_path):
    name = default_name()
    by_name = resolve_encoder(name)
    by_path = resolve_encoder(pretrained_path(name))
    assert by_name.fingerprint == by_path.fingerprint
    with pytest.raises(UnknownEncoderError, match="landmarks-max-512"):
        resolve_encoder("no-such-encoder")
    with pytest.raises(EncoderFileError, match="not found"):
        resolve_encoder(tmp_path / "missing.npz")


def test_cli_lists_the_encoders():
    result = CliRunner().invoke(app, ["encoders", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["name"] for r in rows} == set(SHIPPED)
    assert sum(r["default"] for r in rows) == 1
    plain = CliRunner().invoke(app, ["encoders"])
    assert (
        "landmarks-max-512 (default)" in plain.output and "learned on 1171 images" in plain.output
    )


@pytest.mark.slow
@requires_weights
def test_photos_only_index_build_then_search(tmp_path, monkeypatch):
    """`selret index build PHOTOS --index IDX` with no other option, then `selret search`."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((data_dir("ukbench-56") / "jpg").glob("*.jpg"))[:8]:
        shutil.copy(p, photos / p.name)
    monkeypatch.setenv(
        "SELRET_CACHE", os.environ.get("SELRET_TEST_CACHE") or str(tmp_path / "cache")
    )
    runner = CliRunner()
    built = runner.invoke(app, ["index", "build", str(photos), "--index", str(tmp_path / "idx")])
    assert built.exit_code == 0, built.output
    assert f"encoder: {default_name()} (pre-trained" in built.output
    query = photos / "ukbench00001.jpg"
    found = runner.invoke(app, ["search", str(query), "--index", str(tmp_path / "idx"), "--json"])
    assert found.exit_code == 0, found.output
    rows = json.loads(found.output[found.output.index("{") :])["results"]
    assert rows[0]["path"].endswith("ukbench00001.jpg")
    # UKBench groups of 4: the other three views of object 0 are among the top 4.
    assert {r["path"][-9:] for r in rows[:4]} == {
        "00000.jpg",
        "00001.jpg",
        "00002.jpg",
        "00003.jpg",
    }


def test_encoder_file_with_non_finite_values_is_refused(tmp_path):
    from selret.encoding.persistence import EncoderFileError, read_encoder
    from selret.errors import EncoderError, ExitCode

    src = pretrained_path(default_name())
    with np.load(src, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    name = next(k for k in arrays if k != "__header__" and arrays[k].dtype.kind == "f")
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, **arrays)
    with pytest.raises(EncoderFileError, match="non-finite") as info:
        read_encoder(bad)
    assert isinstance(info.value, EncoderError) and info.value.exit_code == ExitCode.ENCODER
