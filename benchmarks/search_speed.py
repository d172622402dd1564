"""Search speed of selret.search.vectors.VectorIndex: exact vs HNSW vs IVF-PQ on synthetic unit vectors.

For each database size and dimension, builds each index kind with its default parameters and
prints one table row per kind: build time, index size (saved file), query latency
with batches of 1 and of 100 queries, throughput, and recall@k against exact search.

    python benchmarks/search_speed.py --quick
    python benchmarks/search_speed.py --sizes 10000,100000          # at --dim (512)
    python benchmarks/search_speed.py                               # 10k, 100k, 1M x 512; 100k x 4096
    python benchmarks/search_speed.py --data clustered --kinds hnsw,ivfpq

``--data random`` (default) draws database and queries uniformly on the sphere, the hardest case
for approximate search (true neighbours are barely closer than the rest); ``clustered`` draws
them around random centres, closer to how image descriptors spread.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import faiss
import numpy as np

from selret.search.vectors import VectorIndex, recall_at_k

DEFAULT_CONFIGS = "10000x512,100000x512,1000000x512,100000x4096"


def index_file_bytes(index: VectorIndex) -> int:
    """Size of the saved index: its vectors/codes and graph or lists, about its size in RAM
    (less the id hash map of exact/HNSW, ~40 bytes per vector). RSS deltas were too noisy:
    freed buffers of the previous index get reused."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        index.save(path)
        return os.path.getsize(path)


def unit_vectors(n: int, dim: int, rng: np.random.Generator, data: str, centres=None):
    """(n, dim) float32 unit vectors, generated in chunks to stay within float32 memory."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):
        block = out[start : start + 65536]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        if data == "clustered":
            block *= 0.5
            block += centres[rng.integers(0, len(centres), len(block))]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def time_search(index: VectorIndex, queries: np.ndarray, k: int, batch: int, n_queries: int):
    """Seconds per query, searching ``n_queries`` queries in batches of ``batch``."""
    index.search(queries[:batch], k)  # warm-up (first-touch of memory, thread pool start)
    elapsed, done = 0.0, 0
    while done < n_queries:
        chunk = queries[done % len(queries) :][:batch]
        start = time.perf_counter()
        index.search(chunk, k)
        elapsed += time.perf_counter() - start
        done += len(chunk)
    return elapsed / done


def run_config(n: int, dim: int, args) -> None:
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    centres = (
        rng.standard_normal((1000, dim)).astype(np.float32) if args.data == "clustered" else None
    )
    x = unit_vectors(n, dim, rng, args.data, centres)
    queries = unit_vectors(args.queries, dim, rng, args.data, centres)
    ids = np.arange(n, dtype=np.int64)
    truth = None
    for kind in args.kinds:
        gc.collect()
        start = time.perf_counter()
        index = VectorIndex(dim, kind)
        index.add(x, ids)
        build_s = time.perf_counter() - start
        size = index_file_bytes(index)
        single = time_search(index, queries, args.k, 1, args.single)
        batched = time_search(index, queries, args.k, len(queries), len(queries) * args.repeats)
        _, found = index.search(queries, args.k)
        if truth is None:  # exact comes first in --kinds when present
            if kind == "exact":
                truth = found
            else:
                reference = VectorIndex(dim)
                reference.add(x, ids)
                truth = reference.search(queries, args.k)[1]
                del reference
        recall = recall_at_k(found, truth, args.k)
        params = index.params
        detail = {
            "exact": "",
            "hnsw": f"M={params['hnsw_m']} efC={params['ef_construction']} ef={params['ef_search']}",
            "ivfpq": f"nlist={params['nlist']} m={params['pq_m']} nprobe={params['nprobe']}",
        }[kind]
        print(
            f"{n:>9,d} {dim:>5d} {kind:>6s} {build_s:>8.1f} {size / 2**20:>8.1f} "
            f"{size / n:>7.0f} {single * 1e3:>9.2f} {batched * 1e3:>10.3f} {1 / batched:>9.0f} "
            f"{recall:>8.3f}  {detail}",
            flush=True,
        )
        del index
    print(f"# {n:,d} x {dim}: {time.perf_counter() - started:.0f} s in all", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="NxD list, comma-separated")
    parser.add_argument(
        "--sizes", help="database sizes at --dim, e.g. 10000,100000 (overrides --configs)"
    )
    parser.add_argument("--dim", type=int, default=512, help="dimension used with --sizes")
    parser.add_argument("--kinds", default="exact,hnsw,ivfpq")
    parser.add_argument("--data", choices=["random", "clustered"], default="random")
    parser.add_argument(
        "--queries", type=int, default=100, help="query batch size (and recall set)"
    )
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="batches timed per kind")
    parser.add_argument("-k", "--k", type=int, default=10)
    parser.add_argument("--threads", type=int, help="faiss OpenMP threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10k x 512 only, fewer timings")
    args = parser.parse_args()

    if args.quick:
        configs = [(10_000, 512)]
        args.single, args.repeats = 20, 1
    elif args.sizes:
        configs = [(int(n), args.dim) for n in args.sizes.split(",")]
    else:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    args.kinds = args.kinds.split(",")
    args.kinds.sort(key=lambda kind: kind != "exact")  # exact first: it is the recall reference
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    print(
        f"# data={args.data} queries={args.queries} k={args.k} "
        f"threads={faiss.omp_get_max_threads()} faiss={faiss.__version__}"
    )
    print(
        f"{'n':>9s} {'dim':>5s} {'kind':>6s} {'build s':>8s} {'file MB':>8s} {'B/vec':>7s} "
        f"{'ms/q b=1':>9s} {'ms/q b=100':>10s} {'QPS b=100':>9s} {'recall@' + str(args.k):>8s}  params"
    )
    for n, dim in configs:
        run_config(n, dim, args)


if __name__ == "__main__":
    main()
