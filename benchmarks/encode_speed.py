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
other processes hits every method alike. A per-stage breakdown (mask, PCA, embedding, whitening,
aggregation, post-processing) calls the same module functions as ``Encoder.encode`` and checks
that the staged result equals ``encode``'s. On CUDA it also measures batched throughput of the
torch paths (local PCA, T-emb, whitening and ``aggregation.democratic_pool_torch`` on the GPU).
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

from selret.encoding.aggregation import aggregate, democratic_pool_torch
from selret.encoding.encoder import Encoder, EncoderConfig
from selret.encoding.masks import MASKS, compute_mask
from selret.encoding.postprocessing import postprocess
from selret.encoding.preprocessing import l2_normalize
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


STAGES = ("mask+select", "local PCA", "T-emb embed", "whitening+l2", "democratic", "post-process")


def staged_encode(enc: Encoder, fmap: FeatureMap, clock: dict[str, float]) -> np.ndarray:
    """``enc.encode(fmap)`` stage by stage with the same module calls, adding each stage's seconds
    to ``clock``."""
    c, emb = enc.config, enc.embedder_
    t0 = time.process_time()
    local = fmap.local_features(compute_mask(c.mask, fmap))
    t1 = time.process_time()
    reduced = enc.pca_.transform(local)
    t2 = time.process_time()
    phi = emb.embed(reduced)
    t3 = time.process_time()
    if emb.whiten:
        phi = emb.whitener_.transform(phi)
        if emb.normalize_after_whitening:
            phi = l2_normalize(phi)
    t4 = time.process_time()
    if c.aggregation == "democratic":
        psi = aggregate("democratic", phi, gamma=c.democratic_gamma, n_iter=c.democratic_iters)
    else:
        psi = aggregate(c.aggregation, phi)
    t5 = time.process_time()
    out = postprocess(np.asarray(psi, np.float32), enc.rotation_, c.effective_drop, c.alpha)
    t6 = time.process_time()
    for name, dt in zip(STAGES, np.diff([t0, t1, t2, t3, t4, t5, t6]), strict=True):
        clock[name] += dt
    return np.asarray(out, np.float32)


def print_breakdown(label: str, enc: Encoder, maps: Sequence[FeatureMap], repeats: int) -> None:
    ref = [enc.encode(f) for f in maps]
    rounds: dict[str, list[float]] = {s: [] for s in (*STAGES, "rotation only", "encode()")}
    max_diff = 0.0
    for _ in range(repeats):
        clock = dict.fromkeys(STAGES, 0.0)
        for fmap, r in zip(maps, ref, strict=True):
            max_diff = max(max_diff, float(np.abs(staged_encode(enc, fmap, clock) - r).max()))
        for s in STAGES:
            rounds[s].append(clock[s] / len(maps))
        if enc.rotation_ is not None:  # the dominant part of post-processing at high D
            psi = np.ones(enc.rotation_.mean_.shape, np.float32)
            start = time.process_time()
            for _ in maps:
                enc.rotation_.transform(psi)
            rounds["rotation only"].append((time.process_time() - start) / len(maps))
        start = time.process_time()
        for fmap in maps:
            enc.encode(fmap)
        rounds["encode()"].append((time.process_time() - start) / len(maps))
    total = sum(statistics.median(rounds[s]) for s in STAGES)
    print(
        f"\nPer-stage breakdown, {label} (CPU ms/img, process time, median over {repeats} rounds)"
    )
    for name, times in rounds.items():
        if not times:
            continue
        med = statistics.median(times)
        share = f"{100 * med / total:5.1f}%" if name in STAGES else ""
        indent = "  (of which) " if name == "rotation only" else ""
        print(f"  {indent + name:<28} {1e3 * med:9.3f} {share:>7}")
    print(
        f"  {'sum of stages':<28} {1e3 * total:9.3f}   staged == encode(): max |diff| {max_diff:.1e}"
    )


# ---------------------------------------------------------------------------- batched torch


def encode_batch_torch(enc: Encoder, maps: Sequence[FeatureMap], device: torch.device):
    """(B, D) vectors of ``maps`` through the torch paths on ``device``: masks on the CPU, then the
    local features of the whole batch in one (sum n_b, K) tensor through local PCA, T-emb and
    whitening, ``democratic_pool_torch`` over the ragged sets, and ``postprocess`` (numpy) on the
    (B, D) batch. Returns (vectors, seconds before post-processing, seconds of post-processing)."""
    c = enc.config
    start = time.perf_counter()
    local = [enc.select(f) for f in maps]
    x = torch.from_numpy(np.concatenate(local)).to(device)
    phi = enc.embedder_.transform(enc.pca_.transform(x))
    sets = list(phi.split([len(v) for v in local]))
    if c.aggregation == "democratic":
        psi = democratic_pool_torch(sets, gamma=c.democratic_gamma, n_iter=c.democratic_iters)
    else:
        psi = torch.stack([aggregate(c.aggregation, s) for s in sets])
    psi = psi.cpu().numpy()  # synchronises the device
    mid = time.perf_counter()
    out = postprocess(psi.astype(np.float32), enc.rotation_, c.effective_drop, c.alpha)
    return np.asarray(out, np.float32), mid - start, time.perf_counter() - mid


def check_batched(enc: Encoder, maps: Sequence[FeatureMap], device: torch.device) -> float:
    out, _, _ = encode_batch_torch(enc, maps, device)
    return float(np.abs(out - np.stack([enc.encode(f) for f in maps])).max())


def gpu_throughput(encoders: dict[str, Encoder], maps, batch_sizes, repeats: int) -> None:
    device = torch.device("cuda")
    print(
        f"\nBatched torch paths on {torch.cuda.get_device_name(device)} (masks and post-process on CPU)"
    )
    header = f"{'config':<24} {'batch':>5} {'img/s':>9} {'ms/img':>8} {'mask+GPU ms/img':>15} {'post ms/img':>12}"
    print(header)
    print("-" * len(header))
    for label, enc in encoders.items():
        print(
            f"{label:<24} check vs CPU encode(): max |diff| {check_batched(enc, maps[:4], device):.1e}"
        )
        for bs in batch_sizes:
            batch = [maps[i % len(maps)] for i in range(bs)]
            encode_batch_torch(enc, batch, device)  # warm-up: kernels, cached projection
            torch.cuda.synchronize()
            runs = [encode_batch_torch(enc, batch, device)[1:] for _ in range(repeats)]
            dev = statistics.median(r[0] for r in runs) / bs
            post = statistics.median(r[1] for r in runs) / bs
            print(
                f"{label:<24} {bs:5d} {1 / (dev + post):9.1f} {1e3 * (dev + post):8.3f} "
                f"{1e3 * dev:15.3f} {1e3 * post:12.3f}"
            )
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
    ap.add_argument("--batch-sizes", default="1,16,64,256", help="GPU batch sizes (CUDA only)")
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

    # ------------------------------------------------------------ batched torch paths
    # The batch path on the CPU, one thread: checks the code the GPU runs, and shows what batching
    # the images (one GEMM per stage instead of one per image) gains over encode().
    for label in ("MAX-mask 512-D", "MAX-mask 4096-D"):
        if label not in encoders:
            continue
        enc = encoders[label]
        with limit_threads(1):
            diff = check_batched(enc, test[:4], torch.device("cpu"))
            cpu = time.process_time()
            _, dev_s, post_s = encode_batch_torch(enc, test, torch.device("cpu"))
            cpu = (time.process_time() - cpu) / len(test)
            single = time.process_time()
            for fmap in test:
                enc.encode(fmap)
            single = (time.process_time() - single) / len(test)
        print(f"\nbatched torch path on CPU, {label}, batch {len(test)}, 1 thread: max |diff| vs "
              f"encode() {diff:.1e}; {1e3 * cpu:.2f} CPU ms/img vs encode() {1e3 * single:.2f} "
              f"(post-process {1e3 * post_s / len(test):.2f} wall ms/img of the batch)")  # fmt: skip
    if torch.cuda.is_available():
        sizes = [int(b) for b in args.batch_sizes.split(",") if b]
        wanted = ("MAX-mask 512-D", "MAX-mask 4096-D", "none-mask 4096-D")
        gpu_throughput({k: encoders[k] for k in wanted if k in encoders}, test, sizes, repeats)
    else:
        print("\n(no CUDA device: batched GPU throughput not measured)")


if __name__ == "__main__":
    main()
