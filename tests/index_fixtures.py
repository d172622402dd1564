"""What the index and CLI tests share: small generated images, a quickly fitted encoder (random
weights, 96 px), running ``selret`` in a fresh process, and the one-line-error check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from selret.files import CRASH_ENV

ENCODER_CONFIG = dict(weights="random", max_side=96, d=16, k=10, kmeans_iters=5)


def make_images(folder: Path, n: int, seed: int, start: int = 0) -> list[Path]:
    """Distinct images: random blobs and lines on random backgrounds, ``img{start..}.png``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        img = np.full((72, 96, 3), rng.integers(0, 255, 3), np.uint8)
        for _ in range(6):
            c = tuple(int(v) for v in rng.integers(0, 255, 3))
            cv2.circle(
                img, tuple(int(v) for v in rng.integers(0, 96, 2)), int(rng.integers(4, 20)), c, -1
            )
            cv2.line(
                img,
                tuple(int(v) for v in rng.integers(0, 96, 2)),
                tuple(int(v) for v in rng.integers(0, 96, 2)),
                c,
                2,
            )
        p = folder / f"img{i:02d}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def fit_encoder(learn: list[Path], cache: Path, seed: int = 0):
    """An encoder fitted on ``learn`` with :data:`ENCODER_CONFIG` (and ``seed``)."""
    from selret.encoding.encoder import Encoder, EncoderConfig
    from selret.features.extractor import Extractor

    config = EncoderConfig(**ENCODER_CONFIG, seed=seed)
    maps = Extractor.for_config(config, cache=cache).maps(learn, progress=False)
    return Encoder(config).fit(maps)


def selret_process(
    *args: str | Path, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``selret ARGS`` in a fresh process, as a user runs it (one thread; no crash point unless
    ``env`` sets one)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SELRET_THREADS": "1"}
    full_env.pop(CRASH_ENV, None)
    full_env.pop("SELRET_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", "from selret.cli import main; main()", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_error(exit_code: int, stderr: str, expected_code: int, *words: str) -> str:
    """The command failed with ``expected_code``, printing exactly one ``error:`` line (which
    contains ``words``), at most one ``hint:`` line and no traceback. Returns the error line."""
    assert exit_code == expected_code, (exit_code, stderr[-3000:])
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert sum(line.startswith("hint:") for line in stderr.splitlines()) <= 1
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]
