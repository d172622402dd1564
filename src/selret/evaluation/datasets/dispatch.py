"""One entry point for every format: :func:`load_benchmark` by benchmark name or by path."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from selret.errors import DatasetError
from selret.evaluation.datasets.common import list_images, load_json
from selret.evaluation.datasets.folders import read_object_folders
from selret.evaluation.datasets.holidays import read_holidays
from selret.evaluation.datasets.matlab import read_gnd_mat
from selret.evaluation.datasets.model import RetrievalBenchmark
from selret.evaluation.datasets.oxford import read_oxford_gt
from selret.evaluation.datasets.paris250 import read_paris6k_250
from selret.evaluation.datasets.pickles import read_gnd_pkl
from selret.evaluation.datasets.selret_json import JSON_FORMAT, read_benchmark_json
from selret.evaluation.datasets.smvs import read_smvs
from selret.evaluation.datasets.ukbench import UKBENCH_RE, read_ukbench
from selret.files import is_image_name

BENCHMARK_NAMES = (
    "oxford5k",
    "paris6k",
    "oxford105k",
    "paris106k",
    "roxford5k",
    "rparis6k",
    "holidays",
    "ukbench",
    "smvs",
    "paris6k-250",
)


def _find_file(root: Path, candidates: Sequence[str]) -> Path | None:
    """First existing ``candidates`` in ``root`` or ``root/<any subfolder>`` (case-insensitive)."""
    wanted = [c.lower() for c in candidates]
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        files = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
        for c in wanted:
            if c in files:
                return files[c]
    return None


def _image_folder(root: Path) -> Path | None:
    """``root/jpg`` if it exists, else ``root``; None when that folder holds no image at all
    (ground truth without images: names are kept as they are)."""
    folder = root / "jpg" if (root / "jpg").is_dir() else root
    for _, _, filenames in os.walk(folder):
        if any(is_image_name(f) for f in filenames):
            return folder
    return None


def _gt_folder(root: Path) -> Path | None:
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        if any(folder.glob("*_query.txt")):
            return folder
    return None


def _load_named(name: str, root: Path, protocol: str | None) -> RetrievalBenchmark:
    if not root.is_dir():
        raise DatasetError(root, f"dataset folder for {name} not found")
    images = _image_folder(root)
    if name in ("oxford5k", "paris6k", "oxford105k", "paris106k"):
        f = _find_file(root, [f"gnd_{name}.pkl", f"gnd_{name}.mat"])
        if f is not None:
            return (
                read_gnd_pkl(f, images, name=name)
                if f.suffix == ".pkl"
                else read_gnd_mat(f, images, name=name)
            )
        gt = _gt_folder(root) if name in ("oxford5k", "paris6k") else None
        if gt is not None:
            return read_oxford_gt(gt, images, name=name)
        raise DatasetError(root, f"no gnd_{name}.pkl/.mat or *_query.txt ground truth found")
    if name in ("roxford5k", "rparis6k"):
        f = _find_file(root, [f"gnd_{name}.pkl"])
        if f is None:
            raise DatasetError(root, f"gnd_{name}.pkl not found")
        return read_gnd_pkl(f, images, protocol=protocol or "medium", name=name)
    if name == "holidays":
        f = _find_file(root, ["perfect_result.dat", "perfect_result_derived.dat"])
        if f is not None:
            return read_holidays(f, _find_file(root, ["holidays_images.dat"]), images)
        f = _find_file(root, ["gnd_holidays.mat"])
        if f is None:
            raise DatasetError(root, "no perfect_result.dat or gnd_holidays.mat found")
        return read_gnd_mat(f, images, name="holidays")
    if name == "ukbench":
        if images is None:
            raise DatasetError(root, "no UKBench images in this folder")
        return read_ukbench(images, protocol=protocol or "ns")
    if name == "smvs":
        return read_smvs(root)
    if name == "paris6k-250":
        return read_paris6k_250(root, protocol=protocol or "official-12")
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")


def load_benchmark(
    name_or_path: str | Path, root: str | Path | None = None, protocol: str | None = None
) -> RetrievalBenchmark:
    """Load a benchmark by name or from a ground-truth file or folder.

    By name (:data:`BENCHMARK_NAMES`), ``root`` is the dataset folder holding the ground truth
    (in it or one sub-folder down) and the images (``root/jpg`` if present, else ``root``).
    By path: ``.json`` (selret, paris6k-250 ``ground_truth.json`` or SMVS ``groups.json``),
    ``.pkl``, ``.mat``, ``.dat`` (Holidays perfect_result), or a folder (SMVS, paris6k-250,
    Oxford-style gt, UKBench, or else folder-per-object); ``root`` is then the image folder.
    ``protocol``: easy/medium/hard for revisited sets, official-12/loo for paris6k-250,
    ns/loo for UKBench.
    """
    key = str(name_or_path).lower()
    if key in BENCHMARK_NAMES and not Path(name_or_path).exists():
        if root is None:
            raise ValueError(f"load_benchmark({key!r}) needs root, the dataset folder")
        return _load_named(key, Path(root), protocol)
    path = Path(name_or_path)
    if not path.exists():
        raise DatasetError(
            path, f"no such file or folder, and not a benchmark name ({', '.join(BENCHMARK_NAMES)})"
        )
    if path.is_dir():
        if (path / "groups.json").is_file():
            return read_smvs(path)
        if (path / "ground_truth.json").is_file():
            return read_paris6k_250(path, root, protocol=protocol or "official-12")
        if any(path.glob("*_query.txt")):
            return read_oxford_gt(path, root)
        images = list_images(path)
        if images and all(UKBENCH_RE.match(Path(p).stem) for p in images):
            return read_ukbench(path, protocol=protocol or "ns")
        return read_object_folders(path)
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        return read_gnd_pkl(path, root, protocol=protocol)
    if suffix == ".mat":
        return read_gnd_mat(path, root)
    if suffix == ".dat":
        lst = path.parent / "holidays_images.dat"
        return read_holidays(path, lst if lst.is_file() else None, root)
    if suffix == ".json":
        data = load_json(path)
        if data.get("format") == JSON_FORMAT:
            return read_benchmark_json(path, root)
        if "image_labels" in data:
            return read_paris6k_250(path, root, protocol=protocol or "official-12")
        if "groups" in data:
            return read_smvs(path)
        raise DatasetError(
            path, "JSON is neither a selret benchmark, a paris6k-250 ground truth nor SMVS groups"
        )
    raise DatasetError(path, f"unsupported ground-truth file type {path.suffix!r}")
