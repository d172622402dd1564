"""Encode speed: cached pool5 map -> final vector, selective T-emb + democratic versus R-MAC.

Mean time per image to go from one cached conv map (VGG16 pool5 of a 1024-px image) to its final
vector, for the MAX / SUM / SIFT / no mask x {512-D (``temb-demo-512``), 4096-D
(``temb-demo-4096``)} encoders, against R-MAC (``selret.evaluation.baselines.rmac``, L=3, 512-D) on the same
maps in the same run. Printed as a table with the ratio of each method's time to R-MAC's, on one
CPU thread (the paper's setting, its Figure 6) and on all threads. Encoders are fitted first on
a separate learning set of maps; the fit is timed and reported but is no part of per-image time.
The SIFT-mask reads the keypoints stored with each map, so SIFT detection (part of extraction)
is not counted; neither is reading the map from disk (reported on its own line).

    python benchmarks/encode_speed.py --quick
    python benchmarks/encode_speed.py --cache /work/selret-cache --n-images 20 --threads 1,all
    python benchmarks/encode_speed.py --data synthetic

Timing: each round times every method on all test maps, in a shuffled order; per-image times and
ratios to R-MAC are medians over rounds (the ratio is taken within each round), so load from
other processes hits every method alike. A per-stage breakdown (mask, gather, PCA, embedding,
whitening factor, Gram + democratic weights + weighted sum, post-processing) calls the functions
of ``selret.encoding.batched`` that ``Encoder.encode`` calls and checks that the staged result
equals ``encode``'s. A batched section gives images/s of ``Encoder.encode_many`` (``--batch``
maps per call) on 1 and all threads; on CUDA, ``encode_many(device="cuda")`` at
``--batch-sizes``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

from selret.encoding import batched
from selret.encoding.encoder import Encoder, EncoderConfig
from selret.encoding.masks import MASKS, compute_mask
from selret.evaluation.baselines import PCAWhitening, rmac
from selret.features import FeatureMap
from selret.features.cache import FeatureCache
from selret.threads import describe_pools, limit_threads

DEFAULT_CACHE = Path("/work/selret-cache")
PRESETS = ("temb-demo-512", "temb-demo-4096")
MASK_LABELS = {"max": "MAX", "sum": "SUM", "sift": "SIFT", "none": "none"}
RMAC = "R-MAC L=3"
RMAC_PW = "R-MAC L=3 + PCA-w"


# ---------------------------------------------------------------------------- data


def cached_maps(root: Path, n: int, max_side: int = 1024, layer: str = "pool5"):
    """Up to ``n`` FeatureMaps read from a FeatureCache (entries of ``layer`` at ``max_side``), in
    the cache's (hash, i.e. pseudo-random) order, and the mean seconds to read one."""
    cache = FeatureCache(root)
    maps, read_s = [], []
    for path in sorted(root.glob("*/??/*.npz")):
        key = f"{path.parent.parent.name}-{path.stem}"
        manifest = cache.manifest(key) or {}
        if manifest.get("max_side") != max_side or manifest.get("layer") != layer:
            continue
        start = time.perf_counter()
        fmap = cache.get(key)
        if fmap is None:  # being written or unreadable
            continue
        read_s.append(time.perf_counter() - start)
        maps.append(fmap)
        if len(maps) == n:
            break
    return maps, (statistics.median(read_s) if read_s else float("nan"))


def synthetic_maps(n: int, seed: int, shape=(512, 24, 32), image_size=(768, 1024)):
    """ReLU-like maps: spatially smooth noise per channel, thresholded to ~7% non-zero cells (as
    real pool5 maps at 1024 px), log-normal channel scales, and ~1500 random SIFT keypoints."""
    rng = np.random.default_rng(seed)
    k, h, w = shape
    out = []
    for _ in range(n):
        coarse = rng.standard_normal((k, h // 4, w // 4), dtype=np.float32)
        smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
        x = smooth + 0.5 * rng.standard_normal(shape, dtype=np.float32) - 1.65
        x *= rng.lognormal(0.0, 1.0, (k, 1, 1)).astype(np.float32)
        kp = rng.uniform((0, 0), (image_size[1], image_size[0]), (int(rng.integers(300, 3000)), 2))
        out.append(FeatureMap(np.maximum(x, 0), image_size, kp.astype(np.float32)))
    return out


# ---------------------------------------------------------------------------- timing


def time_rounds(
    methods: dict[str, Callable[[FeatureMap], object]],
    maps: Sequence[FeatureMap],
    repeats: int,
    seed: int,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per image of each method, wall-clock and CPU (process time, all threads), one
    value per round; methods run in a shuffled order in every round, after one warm-up call."""
    rng = np.random.default_rng(seed)
    names = list(methods)
    for fn in methods.values():
        fn(maps[0])
    out: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for _ in range(repeats):
        for i in rng.permutation(len(names)):
            fn = methods[names[i]]
            wall, cpu = time.perf_counter(), time.process_time()
            for fmap in maps:
                fn(fmap)
            out[names[i]]["cpu"].append((time.process_time() - cpu) / len(maps))
            out[names[i]]["wall"].append((time.perf_counter() - wall) / len(maps))
    return out


def ratio_to_rmac(per_round: dict, name: str, clock: str) -> float:
    """Median over rounds of (method time / R-MAC time in the same round)."""
    pairs = zip(per_round[name][clock], per_round[RMAC][clock], strict=True)
    return statistics.median(t / b for t, b in pairs)


def print_table(title: str, per_round: dict, info: dict[str, str]) -> None:
    print(f"\n{title}")
    header = (
        f"{'method':<20} {'CPU ms':>8} {'wall ms':>8} {'img/s':>7} {'xRMAC cpu':>9} "
        f"{'xRMAC wall':>10}  notes"
    )
    print(header)
    print("-" * (len(header) + 50))
    for name, t in per_round.items():
        cpu, wall = statistics.median(t["cpu"]), statistics.median(t["wall"])
        print(
            f"{name:<20} {1e3 * cpu:8.2f} {1e3 * wall:8.2f} {1 / wall:7.1f} "
            f"{ratio_to_rmac(per_round, name, 'cpu'):9.2f} "
            f"{ratio_to_rmac(per_round, name, 'wall'):10.2f}  {info.get(name, '')}"
        )


# ---------------------------------------------------------------------------- stages


STAGES = ("mask", "select", "local PCA", "embed", "whitening L", "Gram+weights+sum", "post")


def staged_encode(enc: Encoder, fmap: FeatureMap, clock: dict[str, float]) -> np.ndarray:
    """``enc.encode(fmap)`` of a democratic-aggregation encoder stage by stage with the functions
    ``encode`` calls (``selret.encoding.batched``), adding each stage's CPU seconds to ``clock``."""
    plan = enc._plan()
    if not plan.democratic:
        raise ValueError("the stage breakdown covers the democratic aggregation only")
    t = [time.process_time()]
    mask = compute_mask(plan.mask, fmap).reshape(-1)
    t.append(time.process_time())
    columns = np.compress(mask, fmap.features.reshape(fmap.channels, -1), axis=1)
    t.append(time.process_time())
    reduced = batched.reduce(plan, columns)
    t.append(time.process_time())
    phi = batched.embed(plan, reduced)
    t.append(time.process_time())
    rows = batched.factor(plan, phi)
    t.append(time.process_time())
    aggregated = batched.democratic(plan, rows, np.array([columns.shape[1]]))
    t.append(time.process_time())
    out = batched.finish(plan, aggregated)[0]
    t.append(time.process_time())
    for name, dt in zip(STAGES, np.diff(t), strict=True):
        clock[name] += dt
    return out


def print_breakdown(label: str, enc: Encoder, maps: Sequence[FeatureMap], repeats: int) -> None:
    ref = [enc.encode(f) for f in maps]
    rounds: dict[str, list[float]] = {s: [] for s in (*STAGES, "encode()")}
    max_diff = 0.0
    for _ in range(repeats):
        clock = dict.fromkeys(STAGES, 0.0)
        for fmap, r in zip(maps, ref, strict=True):
            max_diff = max(max_diff, float(np.abs(staged_encode(enc, fmap, clock) - r).max()))
        for s in STAGES:
            rounds[s].append(clock[s] / len(maps))
        start = time.process_time()
        for fmap in maps:
            enc.encode(fmap)
        rounds["encode()"].append((time.process_time() - start) / len(maps))
    total = sum(statistics.median(rounds[s]) for s in STAGES)
    n = np.mean([compute_mask(enc.config.mask, f).sum() for f in maps])
    print(f"\nPer-stage breakdown, {label}, n = {n:.0f} kept features on average "
          f"(CPU ms/img, process time, median over {repeats} rounds)")  # fmt: skip
    for name, times in rounds.items():
        med = statistics.median(times)
        share = f"{100 * med / total:5.1f}%" if name in STAGES else ""
        print(f"  {name:<28} {1e3 * med:9.3f} {share:>7}")
    print(
        f"  {'sum of stages':<28} {1e3 * total:9.3f}   staged == encode(): max |diff| {max_diff:.1e}"
    )
    c = enc.config
    d_emb = c.embedding_dim
    macs = n * d_emb * d_emb / 2 + n * n * d_emb
    print(f"  (whitening L + Gram: {macs / 1e6:.0f} M multiply-adds per image: n D^2 / 2 + n^2 D, "
          f"D = {d_emb})")  # fmt: skip


# ---------------------------------------------------------------------------- batched


def batched_throughput(
    encoders: dict[str, Encoder], maps: Sequence[FeatureMap], threads: list[int], batch: int,
    repeats: int,
) -> None:  # fmt: skip
    """images/s of ``encode_many`` on a batch of ``batch`` maps (the test maps repeated) against
    ``encode`` one map at a time, per thread count; and the largest difference between the two."""
    items = [maps[i % len(maps)] for i in range(batch)]
    print(f"\nBatched encode_many on the CPU, {batch} maps per call (img/s, wall, median of "
          f"{repeats}); encode() one map at a time for comparison")  # fmt: skip
    header = f"{'config':<20} {'threads':>7} {'how':<18} {'encode_many':>12} {'encode()':>9} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    for label, enc in encoders.items():
        diff = float(np.abs(enc.encode_many(maps) - np.stack([enc.encode(f) for f in maps])).max())
        for n in threads:
            # n threads: BLAS's own threads over one batch, or n workers with one BLAS thread each
            ways = {"BLAS threads": {}} | (
                {f"{n} workers": {"workers": n, "batch_size": 8}} if n > 1 else {}
            )
            for how, kwargs in ways.items():
                with limit_threads(n):
                    many, single = [], []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        enc.encode_many(items, **kwargs)
                        many.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        for fmap in maps:
                            enc.encode(fmap)
                        single.append((time.perf_counter() - start) / len(maps))
                print(f"{label:<20} {n:7d} {how:<18} {batch / statistics.median(many):12.1f} "
                      f"{1 / statistics.median(single):9.1f} {diff:11.1e}")  # fmt: skip


def gpu_throughput(encoders: dict[str, Encoder], maps, batch_sizes, repeats: int) -> None:
    device = torch.device("cuda")
    print(f"\nencode_many(device='cuda') on {torch.cuda.get_device_name(device)} "
          "(masks on the CPU, every later stage on the GPU)")  # fmt: skip
    header = f"{'config':<20} {'batch':>6} {'img/s':>10} {'ms/batch':>9}"
    print(header)
    print("-" * len(header))
    for label, enc in encoders.items():
        on_gpu = enc.encode_many(maps, device=device)
        diff = float(np.abs(on_gpu - enc.encode_many(maps)).max())
        print(f"{label:<20} check against the CPU path: max |diff| {diff:.1e}")
        for bs in batch_sizes:
            items = [maps[i % len(maps)] for i in range(bs)]
            enc.encode_many(items, device=device, batch_size=bs, max_elements=1 << 30)  # warm-up
            torch.cuda.synchronize()
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                enc.encode_many(items, device=device, batch_size=bs, max_elements=1 << 30)
                runs.append(time.perf_counter() - start)
            wall = statistics.median(runs)
            print(f"{label:<20} {bs:6d} {bs / wall:10.1f} {1e3 * wall:9.2f}")
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- main


def parse_threads(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        n = (os.cpu_count() or 1) if item.strip() == "all" else int(item)
        if n not in out:
            out.append(n)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="FeatureCache root of pool5 maps at 1024 px",
    )
    ap.add_argument(
        "--data",
        choices=("auto", "cache", "synthetic"),
        default="auto",
        help="auto: cached maps if at least --min-cached exist, else synthetic",
    )
    ap.add_argument("--min-cached", type=int, default=40)
    ap.add_argument(
        "--n-images", type=int, default=None, help="test maps timed per round (20; quick 8)"
    )
    ap.add_argument(
        "--n-learn", type=int, default=None, help="learning maps for the fit (40; quick 16)"
    )
    ap.add_argument(
        "--threads", default="1,all", help="comma list of thread counts; 'all' = os.cpu_count()"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (5; quick 3)")
    ap.add_argument("--masks", default=",".join(MASKS))
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument(
        "--breakdown",
        default="max:temb-demo-512,max:temb-demo-4096",
        help="mask:preset configs to break down by stage ('' for none)",
    )
    ap.add_argument("--batch", type=int, default=64, help="maps per encode_many call on the CPU")
    ap.add_argument("--batch-sizes", default="1,16,64,256,1024", help="GPU batch sizes (CUDA only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer maps and rounds, k-means 20 iterations x 1 restart (fit only)",
    )
    args = ap.parse_args(argv)  # fmt: skip
    n_images = args.n_images or (8 if args.quick else 20)
    n_learn = args.n_learn or (16 if args.quick else 40)
    repeats = args.repeats or (3 if args.quick else 5)
    masks = [m for m in args.masks.split(",") if m]
    presets = [p for p in args.presets.split(",") if p]
    threads = parse_threads(args.threads)
    n_all = os.cpu_count() or 1

    source, read_s = "synthetic", float("nan")
    if args.data != "synthetic":
        maps, read_s = cached_maps(args.cache, n_images + n_learn)
        # Enough real maps: all the run needs (quick asks for fewer than --min-cached), or any
        # four when --data cache insists.
        enough = min(args.min_cached, n_images + n_learn)
        if len(maps) >= enough or (args.data == "cache" and len(maps) >= 4):
            n_images = min(n_images, len(maps) // 2)
            test, learn = maps[:n_images], maps[n_images:]
            source = f"cache {args.cache} ({len(maps)} maps read)"
        elif args.data == "cache":
            raise SystemExit(f"{args.cache}: only {len(maps)} cached pool5/1024 maps")
        else:
            print(f"only {len(maps)} cached maps in {args.cache} (< {enough}): synthetic maps")
    if source == "synthetic":
        test = synthetic_maps(n_images, args.seed)
        learn = synthetic_maps(n_learn, args.seed + 1)
        source = "SYNTHETIC ReLU-like maps 512x24x32 (not real pool5 features)"

    grids = sorted({f.grid_shape for f in test})
    print(f"encode speed  |  {platform.node()}  {platform.processor() or platform.machine()}  "
          f"{n_all} CPUs  torch {torch.__version__}  faiss {faiss.__version__}")  # fmt: skip
    print(f"data: {source}")
    print(f"test {len(test)} maps (grids {grids}), learning {len(learn)} maps, disjoint; "
          f"{repeats} rounds; median cache read {1e3 * read_s:.2f} ms/map (not counted)")  # fmt: skip
    print(describe_pools())

    # ------------------------------------------------------------ fit (all threads)
    encoders: dict[str, Encoder] = {}
    info: dict[str, str] = {}
    fit_iters = {"kmeans_iters": 20, "kmeans_restarts": 1} if args.quick else {}
    with limit_threads(n_all):
        for p in presets:
            for m in masks:
                cfg = EncoderConfig.from_preset(p, mask=m, seed=args.seed, **fit_iters)
                label = f"{MASK_LABELS[m]}-mask {cfg.dim}-D"
                start = time.perf_counter()
                enc = Encoder(cfg).fit(learn)
                fit_s = time.perf_counter() - start
                kept = np.mean([compute_mask(m, f).mean() for f in test])
                n_local = np.mean([compute_mask(m, f).sum() for f in test])
                info[label] = (
                    f"d={cfg.d} k={cfg.k} kept {100 * kept:4.1f}% (n={n_local:5.1f}) fit {fit_s:6.1f}s"
                )
                encoders[label] = enc
                print(f"fitted {label:<20} {info[label]}", flush=True)
        start = time.perf_counter()
        whitening = PCAWhitening().fit(np.stack([rmac(f) for f in learn]))
        info[RMAC_PW] = (
            f"PCA-whitening fit {time.perf_counter() - start:.2f}s on {len(learn)} vectors"
        )
        info[RMAC] = "512-D, cirtorch regions + global, no learning"
    if args.quick:
        print("(quick: k-means 20 iterations x 1 restart; affects fit time only)")

    methods: dict[str, Callable[[FeatureMap], object]] = {
        RMAC: lambda f: rmac(f.features, L=3),
        RMAC_PW: lambda f: whitening.transform(rmac(f.features, L=3)),
    }
    methods |= {label: enc.encode for label, enc in encoders.items()}

    # ------------------------------------------------------------ per-image time
    results = {}
    for n in threads:
        with limit_threads(n):
            per_round = time_rounds(methods, test, repeats, args.seed)
        results[n] = per_round
        print_table(f"Per-image encode time, {n} thread{'s' if n > 1 else ''} "
                    f"(median of {repeats} rounds x {len(test)} maps)", per_round, info)  # fmt: skip

    claim = [f"{MASK_LABELS[m]}-mask 512-D" for m in ("max", "sum")]
    claim = [label for label in claim if label in encoders]
    for n, per_round in results.items():
        for clock in ("cpu", "wall"):
            ratios = {label: ratio_to_rmac(per_round, label, clock) for label in claim}
            if ratios:
                verdict = "HOLDS" if max(ratios.values()) < 1 else "does NOT hold"
                parts = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
                print(f"paper claim (MAX/SUM 512-D faster than R-MAC), {n} thread(s), {clock} "
                      f"time: {verdict} ({parts})")  # fmt: skip

    # ------------------------------------------------------------ stage breakdown
    for item in [s for s in args.breakdown.split(",") if s]:
        mask, preset_name = item.split(":")
        cfg = EncoderConfig.from_preset(preset_name)
        label = f"{MASK_LABELS[mask]}-mask {cfg.dim}-D"
        if label not in encoders:
            print(f"(breakdown {item}: not fitted in this run, skipped)")
            continue
        for n in threads:
            with limit_threads(n):
                print_breakdown(f"{label}, {n} thread(s)", encoders[label], test, repeats)

    # ------------------------------------------------------------ batched encode_many
    wanted = [k for k in ("MAX-mask 512-D", "SUM-mask 512-D", "MAX-mask 4096-D") if k in encoders]
    batched_throughput({k: encoders[k] for k in wanted}, test, threads, args.batch, repeats)
    if torch.cuda.is_available():
        sizes = [int(b) for b in args.batch_sizes.split(",") if b]
        gpu_throughput({k: encoders[k] for k in wanted}, test, sizes, repeats)
    else:
        print("\n(no CUDA device: GPU batched throughput not measured)")


if __name__ == "__main__":
    main()
