"""Crash injection for ``selret extract``: the process is killed (SIGKILL, via
``SELRET_CRASH_AT=POINT:N``, see :func:`selret.files.crash_point`) at fixed points of its work,
then run again. Properties: the entries finished before the kill are kept (the rerun extracts only
the rest), no entry is corrupt or partial, and the final cache equals that of an uninterrupted run.
Random weights, 64 px images."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from badfiles import base_image
from PIL import Image

from selret.features.cache import FeatureCache
from selret.files import CRASH_ENV, list_images

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

MAX_SIDE = 64
N_IMAGES = 8
BATCH = 2


def run_extract(images: Path, cache: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELRET_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    if crash is not None:
        env[CRASH_ENV] = crash
    args = ["extract", images, "--cache", cache, "--weights", "random", "--max-side", MAX_SIDE,
            "--batch-size", BATCH, "--workers", 0, "--no-progress"]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", "from selret.cli import main; main()", *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def entries(cache: Path) -> dict[str, Path]:
    return {p.stem: p for p in cache.glob("*/??/*.npz")}


def counts(output: str) -> tuple[int, int]:
    found = re.search(r"(\d+) extracted, (\d+) already cached", output)
    assert found, output
    return int(found.group(1)), int(found.group(2))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        Image.fromarray(base_image(48, 64, seed=i)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> FeatureCache:
    cache = tmp_path_factory.mktemp("reference") / "cache"
    result = run_extract(images, cache)
    assert result.returncode == 0 and counts(result.stdout) == (N_IMAGES, 0), result.stderr
    return FeatureCache(cache)


def test_crash_point_kills_at_the_nth_hit():
    code = "from selret.files import crash_point as c\nfor i in range(5):\n    c('p'); print(i, flush=True)"
    env = {**os.environ, CRASH_ENV: "other:1,p:3"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == -signal.SIGKILL and result.stdout.split() == ["0", "1"]
    env[CRASH_ENV] = ""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["0", "1", "2", "3", "4"]


# (crash point, hit that kills, complete entries left, whether a temporary file is left).
# atomic_write.before_rename: the first atomic write is the cache's manifest.json, so the 4th hit
# is the 3rd entry. cache.mid_write: half of an entry is in its temporary file.
CASES = [
    ("extract.after_write", 3, 3, False),
    ("extract.between_batches", 2, 2 * BATCH, False),
    ("cache.mid_write", 4, 3, True),
    ("atomic_write.before_rename", 4, 2, True),
]


@pytest.mark.parametrize(("point", "hit", "kept", "temp_left"), CASES, ids=[c[0] for c in CASES])
def test_killed_extract_resumes_to_the_same_cache(
    images, reference, tmp_path, point, hit, kept, temp_left
):
    cache = tmp_path / "cache"
    killed = run_extract(images, cache, crash=f"{point}:{hit}")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert "Traceback" not in killed.stderr

    # What the kill left: finished entries, all readable; at most one temporary file, ignored.
    left = entries(cache)
    assert len(left) == kept == len(FeatureCache(cache))
    reader = FeatureCache(cache)
    for path in left.values():
        assert reader._read(path)[0].features.shape[0] == 512
    temps = [p for p in cache.rglob("*.part")]
    assert len(temps) == int(temp_left)

    resumed = run_extract(images, cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert counts(resumed.stdout) == (N_IMAGES - kept, kept)  # finished work was kept
    final = entries(cache)
    assert set(final) == set(entries(reference.root))
    assert all(final[key].stat().st_mtime_ns == left[key].stat().st_mtime_ns for key in left)
    # Equal to the uninterrupted run (batches were composed differently: float32 rounding).
    for path in list_images(images):
        key = reference.key(path, "random:pool5", MAX_SIDE)
        ref, got = reference.get(key), FeatureCache(cache).get(key)
        assert got.image_size == ref.image_size
        atol = 1e-5 * np.abs(ref.features).max()
        np.testing.assert_allclose(got.features, ref.features, rtol=1e-4, atol=atol)
        np.testing.assert_array_equal(got.keypoints, ref.keypoints)
