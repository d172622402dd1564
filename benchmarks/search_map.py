"""paris6k-250 leave-one-out mAP with synthetic distractors: exact against approximate search, and
binary codes against float vectors (the shape of the paper's Paris106k figure).

The database is the 250 Paris images plus N realistic synthetic distractors (``ann_data.py``: draws
of a Gaussian with the mean and covariance of real selret vectors of images unrelated to Paris, or
with ``--model pooled`` of those and the Paris images: an adversarial set), the very sets and
indexes of ``search_speed.py --data realistic`` (cached in ``--work-dir``). Queries are the 195 loo queries
(each image labelled ``ok`` for a landmark; its landmark's junk images and itself are left out of
its ranking). Rows:

  exact (full)      the exact ranking of the whole database: every positive counts
  exact top-D       exact search truncated at depth D (positives below D count as missed)
  ivf / binary      the approximate kinds, top-D, re-ranked exactly (defaults, calibrated)
  hamming top-D     the binary codes alone, ranked by Hamming distance (no re-ranking)

The binary codes of this script are learned without the Paris images: ITQ on the fit set (356
UKBench + SMVS vectors), or on 10,000 draws of the distractor model (``--itq-on synthetic``).

    python benchmarks/search_map.py --work-dir /work/ann-cache --distractors 0,100000,1000000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
from ann_data import DATA, MODELS, distractor_model, real_vectors, synthetic
from search_speed import build, data_key, database, default_cache

from selret.evaluation.datasets import load_benchmark
from selret.evaluation.metrics import compute_map
from selret.search.binary import BINARY_ROTATIONS, BinaryEncoder, HammingShortlist
from selret.search.kernels import exact_top_k
from selret.search.vectors import VectorIndex

N_PARIS = 250


def mean_ap(ids: np.ndarray, gnd: list[dict]) -> float:
    """mAP of (n_q, depth) result ids, ids >= 250 (distractors) and -1 never relevant."""
    ranks = np.where(ids < N_PARIS, ids, -1).T
    return compute_map(ranks, gnd).map


def exact_full_map(x: np.ndarray, q: np.ndarray, gnd: list[dict]) -> float:
    """mAP of the exact full ranking: each Paris image is placed after every distractor that
    scores higher (counted from sorted distractor scores), so no N-long ranking is stored."""
    paris, distractors = x[:N_PARIS], x[N_PARIS:]
    aps = []
    for start in range(0, len(q), 16):
        block = q[start : start + 16]
        own = block @ paris.T
        above = np.zeros(own.shape, np.int64)
        if len(distractors):
            sorted_d = np.sort(block @ distractors.T, axis=1)
            for i in range(len(block)):
                above[i] = len(distractors) - np.searchsorted(sorted_d[i], own[i], side="right")
        for i, g in enumerate(gnd[start : start + 16]):
            order = np.argsort(-own[i], kind="stable")
            position = np.arange(N_PARIS) + above[i, order]  # merged-ranking position of each
            column = np.full(position[-1] + 1, -1, np.int64)
            column[position] = order
            aps.append(compute_map(column[:, None], [g]).map)
    return float(np.mean(aps))


def hamming_ids(encoder: BinaryEncoder, x: np.ndarray, q: np.ndarray, depth: int):
    """(top-``depth`` ids by Hamming distance, ms per query of that search, one at a time)."""
    codes = HammingShortlist(encoder.n_bits_)
    for start in range(0, len(x), 100_000):
        part = np.ascontiguousarray(x[start : start + 100_000])
        codes.add(encoder.transform(part), np.arange(start, start + len(part)))
    q_codes = encoder.transform(q)
    started = time.perf_counter()
    ids = np.concatenate([codes.search(q_codes[[i]], depth)[1] for i in range(len(q))])
    return ids, (time.perf_counter() - started) / len(q) * 1e3


def binary_index(x: np.ndarray, train: np.ndarray) -> tuple[VectorIndex, float]:
    start = time.perf_counter()
    index = VectorIndex(x.shape[1], "binary")
    index.train(train)  # ITQ learned without the Paris images
    index.add(np.ascontiguousarray(x), np.arange(len(x)))
    return index, time.perf_counter() - start


def row(label: str, value: float, detail: str = "") -> None:
    print(f"| {label} | {100 * value:.2f} | {detail} |", flush=True)


def run(n: int, args, gnd: list[dict], q: np.ndarray, itq_train: np.ndarray) -> None:
    started = time.perf_counter()
    x = database("realistic", n, args)[0] if n else args.real.paris
    depth = min(args.depth, len(x))
    print(f"\n## paris6k-250 loo, {n:,d} distractors (database {len(x):,d}), depth D={depth}")
    print("| search | mAP | notes |\n|---|---|---|")
    row("exact (full)", exact_full_map(x, q, gnd))
    row(f"exact top-{depth}", mean_ap(exact_top_k(np.ascontiguousarray(x), q, depth)[1], gnd))
    for kind in args.kinds:
        if kind == "binary":
            index, seconds = binary_index(x, itq_train)
            detail = f"ITQ on {args.itq_on}, built in {seconds:.0f} s"
        else:
            index, seconds, _ = build(kind, x, data_key("realistic", n, args), args)
            detail = f"built in {seconds:.0f} s"
        settings = " ".join(f"{k}={v}" for k, v in index.settings.items())
        row(f"{kind} top-{depth}", mean_ap(index.search(q, depth)[1], gnd), f"{settings}; {detail}")
        del index
    for rotation in args.hamming:
        encoder = BinaryEncoder(rotation=rotation).fit(itq_train)
        ids, ms = hamming_ids(encoder, x, q, depth)
        row(
            f"hamming top-{depth}, {rotation}",
            mean_ap(ids, gnd),
            f"{encoder.n_bits_ // 8} B/image, fit on {args.itq_on}, {ms:.1f} ms/query",
        )
    print(f"# {n:,d} distractors: {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--distractors", type=ints, default=[0, 100_000, 1_000_000])
    parser.add_argument("--kinds", default="ivf,binary", help="approximate VectorIndex kinds")
    parser.add_argument(
        "--hamming", default="itq,random", help=f"code rotations: {BINARY_ROTATIONS}"
    )
    parser.add_argument("--itq-on", choices=["fit-set", "synthetic"], default="fit-set")
    parser.add_argument("--model", choices=MODELS, default="fit", help="distractors fit on")
    parser.add_argument("--depth", type=int, default=1000, help="results per query")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--build-threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work-dir", type=Path, default=Path.home() / ".cache" / "selret" / "bench"
    )
    parser.add_argument("--paris-cache", type=Path, default=default_cache())
    parser.add_argument("--fit-cache", type=Path, default=default_cache())
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.hamming = [r for r in args.hamming.split(",") if r]
    args.dim, args.queries, args.ef_construction = 512, 200, 100  # as search_speed.py
    faiss.omp_set_num_threads(args.threads)

    args.real = real_vectors(args.work_dir, args.paris_cache, args.fit_cache)
    if args.real is None:
        raise SystemExit(
            f"{DATA / 'paris6k-250'}: missing, and no real vectors cached in {args.work_dir}"
        )
    bench = load_benchmark(DATA / "paris6k-250", protocol="loo")
    gnd = bench.gnd("loo")
    q = np.ascontiguousarray(args.real.paris[[query.image_index for query in bench.queries]])
    if args.itq_on == "fit-set":
        itq_train = args.real.fit
    else:
        model = distractor_model(args.real, args.model)
        itq_train = np.asarray(
            synthetic("realistic", 10_000, args.dim, args.seed + 2, args.work_dir, model)
        )
    print(f"# real vectors: {args.real.source}\n# {len(q)} loo queries; mAP in %")
    for n in args.distractors:
        run(n, args, gnd, q, itq_train)


if __name__ == "__main__":
    main()
