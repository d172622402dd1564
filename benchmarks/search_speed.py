"""Search speed and recall of selret.search.vectors.VectorIndex kinds on realistic and isotropic vectors.

For each data set and size, builds each index kind (defaults, or the settings given) and prints one
row per kind and search setting: build time, bytes per vector (saved file, about its RAM), the bytes
each query scans per vector, ms per query one at a time (mean and median wall time, and mean CPU
time: on a shared machine the median and the CPU figure are the fairer ones) and in batches of 100,
and recall@10 against exact search.

    python benchmarks/search_speed.py --quick                       # 20k, well under a minute
    python benchmarks/search_speed.py --work-dir /work/ann-cache    # 100k and 1M x 512
    python benchmarks/search_speed.py --sizes 1000000 --kinds ivf --nprobe 64,128,256,512

Data (see ``ann_data.py``): ``realistic`` = the 250 real paris6k-250 vectors of the default
pre-trained encoder plus N synthetic distractors drawn from a Gaussian with the mean and covariance
of real selret vectors of photos unrelated to Paris (``--model pooled``: of those and the Paris
images); its queries are 200 further draws ("synth q") and the 250 real vectors ("real q", each
finds itself and its landmark). ``isotropic`` = N vectors uniform on the sphere,
the worst case for approximate search. Sets of 100k and more, and the approximate indexes built
on them, are cached in ``--work-dir``: a rerun reloads them and reports the build time recorded
at build (exact indexes are rebuilt: a copy of the vectors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
from ann_data import MODELS, distractor_model, real_vectors, synthetic

from selret.search.kernels import exact_top_k
from selret.search.vectors import VectorIndex, choose_kind, recall_at_k

K = 10


def default_cache() -> Path:
    return Path(os.environ.get("SELRET_CACHE", Path.home() / ".cache" / "selret" / "features"))


def database(data: str, n: int, args):
    """(vectors, query sets {name: queries}, description) of one data set at size ``n``."""
    dim = args.dim
    if data == "isotropic":
        x = synthetic("isotropic", n, dim, args.seed, args.work_dir)
        queries = {
            "synth q": np.asarray(
                synthetic("isotropic", args.queries, dim, args.seed + 1, args.work_dir)
            )
        }
        return x, queries, "uniform on the sphere"
    real = args.real
    model = distractor_model(real, args.model)
    draws = synthetic("realistic", n, dim, args.seed, args.work_dir, model)
    x = np.concatenate([real.paris, draws])  # ids 0..249 are the paris images
    queries = {
        "synth q": synthetic("realistic", args.queries, dim, args.seed + 1, args.work_dir, model),
        "real q": real.paris,
    }
    return x, queries, f"250 real + {n:,d} draws of a {model.describe()}"


def data_key(data: str, n: int, args) -> str:
    """Names the cached files of one data set (the real vectors' digest for realistic sets)."""
    real = (
        f"-{args.model}-{hashlib.sha256(args.real.paris.tobytes()).hexdigest()[:8]}"
        if data == "realistic"
        else ""
    )
    return f"{data}-{n}x{args.dim}-seed{args.seed}{real}"


def ground_truth(x: np.ndarray, queries: dict, key: str, args) -> dict:
    """Exact top-K ids per query set (cached in the work dir for large sets)."""
    path = args.work_dir / f"truth-{key}.npz"
    if path.exists():
        return dict(np.load(path))
    base = np.ascontiguousarray(x)
    truth = {name: exact_top_k(base, q, K)[1] for name, q in queries.items()}
    if len(x) >= 100_000:
        np.savez(path, **truth)
    return truth


def params_key(kind: str, params: dict) -> str:
    text = json.dumps({"kind": kind, **params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def build(kind: str, x: np.ndarray, key: str, args) -> tuple[VectorIndex, float, int]:
    """(index, build seconds, saved bytes); large indexes are saved to and reloaded from the work dir."""
    params = {"ef_construction": args.ef_construction} if kind == "hnsw" else {}
    if kind in ("ivf", "ivfpq") and getattr(args, "pq_m", None):
        params["pq_m"] = args.pq_m
    path = args.work_dir / f"index-{key}-{kind}-{params_key(kind, params)}.vi"
    meta = path.with_suffix(".json")
    cache = len(x) >= 100_000 and kind != "exact"
    if cache and path.exists() and meta.exists() and not args.rebuild:
        index = VectorIndex.load(path, kind=kind, **params)
        return index, json.loads(meta.read_text())["build_s"], path.stat().st_size
    faiss.omp_set_num_threads(args.build_threads or args.threads)
    start = time.perf_counter()
    index = VectorIndex(x.shape[1], kind, **params)
    index.add(np.ascontiguousarray(x), np.arange(len(x)))
    build_s = time.perf_counter() - start
    faiss.omp_set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    index.save(path)
    size = path.stat().st_size
    if cache:
        meta.write_text(
            json.dumps({"build_s": build_s, "threads": args.build_threads or args.threads})
        )
    else:  # saved only to measure its size
        path.unlink()
    return index, build_s, size


def time_search(index: VectorIndex, q: np.ndarray, batch: int, n: int, budget_s: float):
    """(mean wall ms, median wall ms, mean CPU ms) per query over up to ``n`` queries in batches
    of ``batch`` (at least one batch, at most ``budget_s`` seconds). The median of the batches'
    per-query times shrugs off the stalls that other processes cause on a shared machine."""
    index.search(q[:batch], K)  # warm-up: first touch of memory, thread pool start
    walls, cpu, done = [], 0.0, 0
    while done < n and (sum(walls) < budget_s or not done):
        chunk = q[done % len(q) :][:batch]
        w0, c0 = time.perf_counter(), time.process_time()
        index.search(chunk, K)
        walls.append((time.perf_counter() - w0) / len(chunk))
        cpu += time.process_time() - c0
        done += len(chunk)
    return sum(walls) / len(walls) * 1e3, float(np.median(walls)) * 1e3, cpu / done * 1e3


def settings(index: VectorIndex, args) -> list[dict]:
    """The search settings to time (live attributes of VectorIndex): the index's own (defaults
    and calibration) first, then the values asked for on the command line."""
    sweep = {
        "hnsw": [{"ef_search": v} for v in args.ef or []],
        "ivf": [
            {"nprobe": p, "k_factor": f}
            for p in args.nprobe or [None]
            for f in args.k_factor or [None]
            if (p, f) != (None, None)
        ],
        "binary": [{"k_factor": f} for f in args.binary_k_factor or []],
        "ivfpq": [{"nprobe": p} for p in args.nprobe or []],
    }.get(index.index_kind, [])
    own = {name: getattr(index, name) for setting in sweep for name in setting}
    return [own, *sweep]


def describe(index: VectorIndex) -> tuple[str, int]:
    """(settings in use, bytes a query scans per vector) of a built index."""
    settings = dict(index.settings)
    scanned = settings.pop("scan_bytes")
    return " ".join(f"{name}={value}" for name, value in settings.items()), scanned


def run(data: str, n: int, args) -> None:
    started = time.perf_counter()
    x, queries, text = database(data, n, args)
    key = data_key(data, n, args)
    truth = ground_truth(x, queries, key, args)
    print(
        f"\n## {data}: {len(x):,d} x {args.dim} ({text}); auto -> {choose_kind(len(x))}", flush=True
    )
    names = list(queries)
    print(
        "| kind | build s | B/vec | scanned B/vec | ms/q b=1 | median | CPU ms/q b=1 | ms/q b=100 | "
        + " | ".join(f"recall@{K} {name}" for name in names)
        + " | settings |"
    )
    print("|---" * (9 + len(names)) + "|")
    for kind in args.kinds:
        index, build_s, size = build(kind, x, key, args)
        for setting in settings(index, args):
            for attr, value in setting.items():
                setattr(index, attr, value)
            q = queries["synth q"]
            single, median, single_cpu = time_search(index, q, 1, args.single, args.budget)
            batched = time_search(index, q, 100, len(q) * args.repeats, args.budget)[0]
            recalls = [recall_at_k(index.search(queries[m], K)[1], truth[m], K) for m in names]
            detail, scanned = describe(index)
            label = kind if kind == index.index_kind else f"{kind}->{index.index_kind}"
            print(
                f"| {label} | {build_s:.1f} | {size / len(x):.0f} | {scanned} | {single:.2f} | "
                f"{median:.2f} | {single_cpu:.2f} | {batched:.3f} | "
                + " | ".join(f"{r:.3f}" for r in recalls)
                + f" | {detail} |",
                flush=True,
            )
        del index
    print(f"# {data} {n:,d}: {time.perf_counter() - started:.0f} s in all", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument(
        "--sizes", type=ints, default=[100_000, 1_000_000], help="synthetic vectors"
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", default="realistic,isotropic", help="realistic and/or isotropic")
    parser.add_argument(
        "--model", choices=MODELS, default="fit", help="realistic distractors fit on (ann_data.py)"
    )
    parser.add_argument(
        "--kinds", default="exact,ivf,hnsw,binary,ivfpq", help="VectorIndex kinds, or auto"
    )
    parser.add_argument("--queries", type=int, default=200, help="synthetic queries (recall set)")
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument(
        "--repeats", type=int, default=2, help="passes over the queries in batches of 100"
    )
    parser.add_argument("--budget", type=float, default=20.0, help="seconds at most per timing")
    parser.add_argument(
        "--nprobe", type=ints, help="ivf / ivfpq lists visited (default: the kind's)"
    )
    parser.add_argument("--k-factor", type=ints, help="ivf short list per result")
    parser.add_argument(
        "--pq-m", type=int, help="ivf / ivfpq PQ sub-quantizers (default: the kind's)"
    )
    parser.add_argument("--binary-k-factor", type=ints, help="binary short list per result")
    parser.add_argument("--ef", type=ints, help="HNSW efSearch values")
    parser.add_argument("--ef-construction", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads (search)")
    parser.add_argument(
        "--build-threads", type=int, help="faiss threads to build (default --threads)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work-dir", type=Path, default=Path.home() / ".cache" / "selret" / "bench"
    )
    parser.add_argument("--paris-cache", type=Path, default=default_cache(), help="1024-px maps")
    parser.add_argument("--fit-cache", type=Path, default=default_cache(), help="512-px maps")
    parser.add_argument("--rebuild", action="store_true", help="ignore cached indexes")
    parser.add_argument(
        "--quick", action="store_true", help="20k realistic vectors, exact/ivf/binary"
    )
    args = parser.parse_args()

    if args.quick:
        args.sizes, args.kinds, args.data = [20_000], "exact,ivf,binary", "realistic"
        args.queries, args.single, args.repeats, args.budget = 100, 30, 1, 5.0
    args.kinds = args.kinds.split(",")
    faiss.omp_set_num_threads(args.threads)
    datasets = args.data.split(",")
    if "realistic" in datasets:
        args.real = real_vectors(args.work_dir, args.paris_cache, args.fit_cache)
        if args.real is None:
            print("# no real vectors (../shared/data missing and none cached): isotropic only")
            datasets = [d for d in datasets if d != "realistic"] or ["isotropic"]
        else:
            print(f"# real vectors: {args.real.source}")
    print(
        f"# k={K} faiss threads={args.threads} (build {args.build_threads or args.threads}) "
        f"faiss={faiss.__version__} "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for data in datasets:
        for n in args.sizes:
            run(data, n, args)


if __name__ == "__main__":
    main()
