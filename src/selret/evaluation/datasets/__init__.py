"""Retrieval benchmarks: one in-memory description and one reader per ground-truth format.

A :class:`RetrievalBenchmark` (:mod:`.model`) is a list of database images (paths relative to
``root``) and a list of :class:`Query` records with their *raw* ground truth (``ok``, ``junk``,
and revisited ``easy`` / ``hard``) as 0-based database indices. The protocol (standard, leave-one-out,
N-S, revisited Easy / Medium / Hard) is applied only when scoring, by :meth:`RetrievalBenchmark.gnd`.

Readers (each takes the real on-disk format):

* :func:`read_oxford_gt` (:mod:`.oxford`) - Oxford5k / Paris6k ``<query>_{good,ok,junk,query}.txt``;
* :func:`read_gnd_mat` (:mod:`.matlab`) - MATLAB ``gnd_*.mat`` structs (Oxford5k, Paris6k,
  Holidays, Oxford105k, ...);
* :func:`read_gnd_pkl` (:mod:`.pickles`) - cirtorch ``gnd_*.pkl`` and revisited ``gnd_r*.pkl``;
* :func:`read_holidays` (:mod:`.holidays`) - INRIA Holidays ``perfect_result.dat``;
* :func:`read_ukbench` (:mod:`.ukbench`), :func:`read_smvs` (:mod:`.smvs`),
  :func:`read_paris6k_250` (:mod:`.paris250`), :func:`read_object_folders` (:mod:`.folders`);
* :func:`read_image_list` / :func:`add_distractors` (R1M, Flickr100k), :func:`read_rotation_list`
  (:mod:`.lists`); :func:`read_benchmark_json` (:mod:`.selret_json`).

:func:`write_gnd` (:mod:`.writer`) saves any benchmark (JSON, or revisited-format pickle) and
:func:`load_benchmark` (:mod:`.dispatch`) dispatches on a benchmark name or a path.
"""

from selret.errors import DatasetError
from selret.evaluation.datasets.common import list_images
from selret.evaluation.datasets.dispatch import BENCHMARK_NAMES, load_benchmark
from selret.evaluation.datasets.folders import read_object_folders
from selret.evaluation.datasets.holidays import read_holidays
from selret.evaluation.datasets.lists import add_distractors, read_image_list, read_rotation_list
from selret.evaluation.datasets.matlab import read_gnd_mat
from selret.evaluation.datasets.model import (
    NS_SCORE,
    PROTOCOLS,
    Query,
    RetrievalBenchmark,
    apply_protocol,
    protocol_name,
)
from selret.evaluation.datasets.oxford import read_oxford_gt
from selret.evaluation.datasets.paris250 import PARIS250_PROTOCOLS, read_paris6k_250
from selret.evaluation.datasets.pickles import read_gnd_pkl
from selret.evaluation.datasets.selret_json import read_benchmark_json
from selret.evaluation.datasets.smvs import read_smvs
from selret.evaluation.datasets.ukbench import UKBENCH_PROTOCOLS, read_ukbench, ukbench_groups
from selret.evaluation.datasets.writer import write_gnd
from selret.evaluation.metrics import REVISITED_PROTOCOLS

__all__ = [
    "BENCHMARK_NAMES",
    "DatasetError",
    "NS_SCORE",
    "PARIS250_PROTOCOLS",
    "PROTOCOLS",
    "Query",
    "REVISITED_PROTOCOLS",
    "RetrievalBenchmark",
    "UKBENCH_PROTOCOLS",
    "add_distractors",
    "apply_protocol",
    "list_images",
    "load_benchmark",
    "protocol_name",
    "read_benchmark_json",
    "read_gnd_mat",
    "read_gnd_pkl",
    "read_holidays",
    "read_image_list",
    "read_object_folders",
    "read_oxford_gt",
    "read_paris6k_250",
    "read_rotation_list",
    "read_smvs",
    "read_ukbench",
    "ukbench_groups",
    "write_gnd",
]
