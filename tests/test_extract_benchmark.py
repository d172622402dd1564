"""The extraction benchmark runs (it is not timed here) and channels_last changes no numbers."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from selret.features.backbones import load_backbone

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "extract_speed.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("extract_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_channels_last_gives_the_same_maps():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    nchw = load_backbone("random", "pool5").forward_maps(rgb)
    nhwc = load_backbone("random", "pool5", channels_last=True).forward_maps(rgb)
    assert nchw.shape == nhwc.shape == (2, 512, 2, 3)
    np.testing.assert_allclose(nhwc, nchw, rtol=1e-4, atol=1e-4 * float(np.abs(nchw).max()))


def test_extract_benchmark_reports_every_figure(tmp_path):
    bench = _load_benchmark()
    out = tmp_path / "out.json"
    results = bench.main(
        ["--synthetic", "-n", "3", "--max-side", "64", "--threads", "1", "--batch-size", "2",
         "--workers", "1", "--json", str(out)]
    )  # fmt: skip
    assert out.is_file()
    for figure in ("extract", "pipeline", "raw_forward"):
        rate = results[figure]["images_per_s"]
        assert math.isfinite(rate) and rate > 0, figure
    assert results["raw_forward"]["over_raw"] == 1.0
    assert results["input_sizes"] == ["64x48"]
