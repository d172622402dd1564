"""The paper's experiments on a tiny generated set with random weights: grids, tables, figures."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_eval_run import write_learning, write_objects

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.encoding.postprocessing import l2_normalize, power_law
from selret.evaluation import experiments as ex
from selret.evaluation.datasets import read_object_folders
from selret.evaluation.runs import encode_data

# The tiny learning sets here are deliberate: the encoder's warning about them is expected.
pytestmark = pytest.mark.filterwarnings("ignore::selret.encoding.encoder.SmallLearningSetWarning")

SIZE = 128
FAST = {"kmeans_iters": 5, "kmeans_restarts": 1}
# Small (d, k) per framework that leave dimensions after the paper's drop rule.
SMALL_FRAMEWORKS = {
    "FV+avg": {"embedding": "fv", "aggregation": "average", "d": 8, "k": 4},
    "VLAD+sum": {"embedding": "vlad", "aggregation": "sum", "d": 8, "k": 4},
    "T-emb+demo": {"embedding": "temb", "aggregation": "democratic", "d": 16, "k": 10},
    "F-FAemb+demo": {"embedding": "faemb", "aggregation": "democratic", "d": 4, "k": 10},
}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    base = tmp_path_factory.mktemp("exp")
    return (
        write_objects(base / "objects", n_objects=3, n_views=3, seed=3),
        write_learning(base / "learn", n=12),
        base / "cache",
    )


@pytest.fixture(scope="module")
def setup(layout):
    objects, learn, cache = layout
    return ex.make_setup(
        read_object_folders(objects),
        [learn],
        weights="random",
        max_side=SIZE,
        cache_dir=cache,
        base=FAST,
    )


def check_saved(result, tmp_path):
    files = result.save(tmp_path / result.name)
    assert [f.suffix for f in files] == [".json", ".md", ".png"]
    data = json.loads(files[0].read_text())
    assert data["rows"] and len(data["rows"]) == len(result.rows)
    assert files[1].read_text().startswith(f"### {result.title}")
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def test_frameworks_grid(setup, tmp_path):
    result = ex.frameworks(setup, masks=("max", "none"), frameworks=SMALL_FRAMEWORKS)
    assert [(r["framework"], r["mask"]) for r in result.rows] == [
        (f, m) for f in SMALL_FRAMEWORKS for m in ("max", "none")
    ]
    for r in result.rows:
        assert r["D"] == EncoderConfig(**SMALL_FRAMEWORKS[r["framework"]]).dim
        assert 0 <= r["mAP"] <= 1 and len(r["per_query_ap"]) == 9
    data = check_saved(result, tmp_path)
    assert data["setup"]["learning_set"] == {"name": "learn", "n_images": 12}


def test_dims_flag_rotations_completed_for_lack_of_learning_images(setup, tmp_path):
    result = ex.dimensions(setup, presets=("temb-demo-512", "temb-demo-1024"), masks=("max",))
    assert [r["D"] for r in result.rows] == [512, 1024]
    # 12 learning images teach at most 11 rotation components of d * k = 640 / 1152.
    assert [r["learned comps"] for r in result.rows] == [11, 11]
    check_saved(result, tmp_path)


def test_image_size_extracts_each_size(setup, tmp_path):
    result = ex.image_sizes(setup, sizes=(96, SIZE), masks=("max", "none"))
    assert [(r["size"], r["mask"]) for r in result.rows] == [
        (96, "max"),
        (96, "none"),
        (SIZE, "max"),
        (SIZE, "none"),
    ]
    assert {96, SIZE} <= {size for _, size in setup._data}
    assert setup.data(max_side=96).db[0].image_size == (72, 96)
    assert all(r["kept %"] == 1.0 for r in result.rows if r["mask"] == "none")
    check_saved(result, tmp_path)


def test_layers_extract_each_layer(setup, tmp_path):
    result = ex.layers(setup, layers=("conv5_1", "pool5"), masks=("max",))
    assert [r["layer"] for r in result.rows] == ["conv5_1", "pool5"]
    assert setup.data(layer="conv5_1").layer == "conv5_1"
    assert not np.array_equal(
        setup.data(layer="conv5_1").db[0].features, setup.data().db[0].features
    )
    check_saved(result, tmp_path)


def test_alpha_shortcut_equals_encoding_with_that_alpha(setup, tmp_path):
    result = ex.alphas(setup, alphas=(0.3, 1.0), masks=("max",))
    assert [r["alpha"] for r in result.rows] == [0.3, 1.0]
    # The experiment encodes once with alpha = 1 and applies the power law afterwards; that must
    # equal an encoder whose config says alpha = 0.3 (same learned state).
    data = setup.data()
    enc = Encoder(setup.config("temb-demo-512", mask="max", alpha=1.0)).fit(data.learn)
    db1, _, _ = encode_data(enc, data)
    enc03 = Encoder(dataclasses.replace(enc.config, alpha=0.3))
    enc03.pca_, enc03.embedder_, enc03.rotation_ = enc.pca_, enc.embedder_, enc.rotation_
    np.testing.assert_allclose(
        l2_normalize(power_law(db1, 0.3)), enc03.encode_many(data.db), atol=1e-5
    )
    full = setup.run_encoder(setup.config("temb-demo-512", mask="max", alpha=0.3))
    assert result.rows[0]["mAP"] == pytest.approx(full.map)
    check_saved(result, tmp_path)


def test_masks_fractions_and_correlations(setup, tmp_path):
    result = ex.masks(setup, masks=("none", "max"), preset=None)
    rows = {r["mask"]: r for r in result.rows}
    assert rows["none"]["kept %"] == 1.0 and rows["none"]["kept sd"] == 0.0
    assert 0 < rows["max"]["kept %"] <= 1
    for mask, hist in result.extra["histograms"].items():
        assert sum(hist) == pytest.approx(1.0)
        assert -1 <= rows[mask]["mean corr"] <= 1
    assert "mAP" not in rows["none"]
    check_saved(result, tmp_path)


def test_feature_correlations_of_known_features():
    from selret.features import FeatureMap

    f = np.zeros((2, 1, 3), np.float32)
    f[:, 0, 0] = (1, 0)
    f[:, 0, 1] = (0, 1)
    f[:, 0, 2] = (1, 1)  # cosines: 0, 1/sqrt(2), 1/sqrt(2)
    bins = np.linspace(-1, 1, 5)
    counts, total, n = ex.feature_correlations(FeatureMap(f, (32, 96)), np.ones((1, 3), bool), bins)
    assert n == 3 and total == pytest.approx(np.sqrt(2))
    assert counts.tolist() == [0, 0, 1, 2]


def test_baselines_against_the_method(setup, tmp_path):
    result = ex.baselines(
        setup,
        baselines=("spoc", "mac"),
        whiten=(False, True),
        masks=("max",),
        presets=("temb-demo-512",),
    )
    assert [r["method"] for r in result.rows] == [
        "spoc",
        "spoc+PCAw",
        "mac",
        "mac+PCAw",
        "MAX-mask T-emb+demo",
    ]
    assert [r["D"] for r in result.rows] == [512, 11, 512, 11, 512]
    text = check_saved(result, tmp_path)
    assert text["rows"][0]["per_group"]  # three objects: per-group figures are kept
    assert "Per group, mAP / top-1" in result.to_markdown()


def test_make_setup_subsamples_the_learning_set(layout):
    objects, learn, cache = layout
    s = ex.make_setup(read_object_folders(objects), [learn], max_learn=4, seed=1, weights="random")
    assert len(s.learn) == 4 and s.learn_name == "learn (random 4)"
    again = ex.make_setup(
        read_object_folders(objects), [learn], max_learn=4, seed=1, weights="random"
    )
    assert again.learn == s.learn


def test_cli_experiment(layout, tmp_path):
    from typer.testing import CliRunner

    import selret.cli
    import selret.cli.evaluate  # noqa: F401  (registers the commands if __init__ does not yet)

    objects, learn, cache = layout
    out = tmp_path / "out"
    result = CliRunner().invoke(selret.cli.app, [
        "experiment", "masks", str(objects), "--learn", str(learn), "--weights", "random", "--max-side", str(SIZE),
        "--cache", str(cache), "--out", str(out), "--masks", "max,sum", "--kmeans-iters", "5", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| max |" in result.output
    assert {p.name for p in out.iterdir()} == {"masks.json", "masks.md", "masks.png"}


def test_fitted_encoders_are_reused_for_the_same_config_and_learning_set(layout, tmp_path):
    objects, learn, cache = layout
    kwargs = dict(
        weights="random", max_side=SIZE, cache_dir=cache, base=FAST, encoder_dir=tmp_path / "enc"
    )
    first = ex.make_setup(read_object_folders(objects), [learn], **kwargs)
    config = first.config("temb-demo-512", mask="max")
    fitted = first.run_encoder(config)
    assert len(list((tmp_path / "enc").glob("*.npz"))) == 1 and fitted.times["fit"] > 0
    # A new setup (another process, say) with the same config and learning set reuses the fit.
    again = ex.make_setup(read_object_folders(objects), [learn], **kwargs).run_encoder(config)
    assert again.times["fit"] == 0.0 and again.map == pytest.approx(fitted.map)
    assert again.learning_set["name"] == "learn" and again.learning_set["disjoint_checked"]
    assert any("reused" in n for n in again.notes)
    # Another learning set (a subset) is another fit.
    other = ex.make_setup(read_object_folders(objects), [learn], max_learn=8, **kwargs)
    assert other.run_encoder(config).times["fit"] > 0
    assert len(list((tmp_path / "enc").glob("*.npz"))) == 2


# --------------------------------------------------------------------------- smells fixed (issue 9)

IMPORT_CHECK = """
import sys, types
import selret.evaluation.data, selret.evaluation.runs, selret.evaluation.plots  # what it builds on
import selret.encoding.presets, selret.encoding.masks

def snapshot():
    out = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("selret.") or name.startswith("selret.evaluation.experiment"):
            continue
        for key, value in vars(mod).items():
            if isinstance(value, types.ModuleType):
                continue  # importing a submodule binds it on its package: not a mutation
            if isinstance(value, (dict, list, set, tuple, str, int, float, bool, type(None))):
                out[name, key] = repr(value)
            else:
                out[name, key] = (id(value), tuple(sorted(getattr(value, "__dict__", {}))))
    return out

before = snapshot()
import selret.evaluation.experiments as ex
after = {k: v for k, v in snapshot().items() if k[0] in {n for n, _ in before}}
changed = sorted(k for k in before if before[k] != after.get(k))
assert not changed, changed
assert not [k for k in vars(ex) if k.startswith("_fields")], "import-time loop variable left behind"
assert ex.FRAMEWORKS["FV+avg"] == {"embedding": "fv", "aggregation": "average", "d": 48, "k": 44}
print("ok")
"""


def test_importing_experiments_leaves_other_modules_untouched():
    # A fresh interpreter: the import must run no code that changes another module's state, nor
    # build its own tables by mutating them in a module-level loop.
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def toy_result() -> ex.ExperimentResult:
    setup = {"dataset": "toy", "protocol": "standard", "n_db": 3, "n_queries": 2,
             "learning_set": {"name": "learn", "n_images": 4}, "weights": "random",
             "layer": "pool5", "max_side": SIZE}  # fmt: skip
    rows = [
        {"mask": "max", "alpha": a, "D": 8, "mAP": 0.5 + a / 4, "top-1": 1.0} for a in (0.5, 1.0)
    ]
    return ex.ExperimentResult("alpha", "Toy", ["mask", "alpha", "D", "mAP", "top-1"], rows, setup)


def test_experiment_files_are_written_atomically(tmp_path, monkeypatch):
    result = toy_result()
    real_replace, renamed = os.replace, []

    def recording(src, dst):
        renamed.append(os.fspath(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    files = result.save(tmp_path / "ok")
    # Every file is renamed into place from a temporary, and no temporary stays behind.
    assert sorted(renamed) == sorted(os.fspath(f) for f in files)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "alpha.json",
        "alpha.md",
        "alpha.png",
    ]

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        result.save(tmp_path / "crashed")
    assert list((tmp_path / "crashed").iterdir()) == []  # nothing partial
