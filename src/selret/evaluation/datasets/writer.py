"""Saving a benchmark's ground truth, atomically: selret's JSON or the revisitop pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from selret.evaluation.datasets.model import RetrievalBenchmark
from selret.evaluation.datasets.pickles import revisitop_payload
from selret.evaluation.datasets.selret_json import benchmark_to_json
from selret.files import atomic_write


def write_gnd(benchmark: RetrievalBenchmark, path: str | Path) -> Path:
    """Save a benchmark's ground truth; the format follows the suffix.

    ``.json``: selret's own format (every field; :func:`~.selret_json.read_benchmark_json`).
    ``.pkl``: the revisitop pickle (:func:`~.pickles.revisitop_payload`). The file is replaced
    atomically: a crash never leaves a half-written ground truth.
    """
    path = Path(path)
    if path.suffix == ".json":
        data = json.dumps(benchmark_to_json(benchmark), indent=1).encode("utf-8")
    elif path.suffix == ".pkl":
        data = pickle.dumps(revisitop_payload(benchmark), protocol=4)
    else:
        raise ValueError(f"{path}: write_gnd writes .json or .pkl, not {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data))
    return path
