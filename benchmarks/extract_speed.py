"""Speed and peak memory of feature extraction, end to end versus the bare network forward.

End to end = ``selret.features.extract.extract_to_cache`` on real files into a fresh cache: decode, EXIF,
resize to ``--max-side``, SIFT, VGG16 forward, atomic cache write. The ceiling is the network alone
(``backbone.net``) on random tensors of the same sizes and batches, in the same process. On CUDA it
also times the bare forward at float32 / float16 / bfloat16 and batch sizes 1, 4, 8, 16.

    python benchmarks/extract_speed.py                       # first 8 Paris6k images, CPU
    python benchmarks/extract_speed.py -n 4 --threads 2
    python benchmarks/extract_speed.py FOLDER --device cuda --json out.json

Peak memory is the process's maximum resident set size (``getrusage``; tracemalloc misses torch's
allocations) and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from selret.features.backbones import load_backbone
from selret.features.cache import FeatureCache
from selret.features.extract import DEFAULT_NUM_WORKERS, cache_id, extract_to_cache
from selret.files import list_images

DEFAULT_IMAGES = Path("/work/shared/data/paris6k-250/jpg")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def cuda_peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / (1 << 20)


def synthetic_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` 1024 x 768 JPEGs of smooth random texture (SIFT finds keypoints in them)."""
    import cv2

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        img = cv2.resize(small, (1024, 768), interpolation=cv2.INTER_CUBIC)
        path = folder / f"synthetic_{i:03d}.jpg"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_raw_forward(
    backbone, shapes: list[tuple[int, int]], batch_size: int, dtype: torch.dtype
) -> float:
    """Seconds for ``backbone.net`` on random inputs of ``shapes``, batched like the extraction
    batches them (equal sizes together, ``batch_size`` at a time)."""
    device = backbone.device
    total = 0.0
    for (h, w), count in sorted(Counter(shapes).items()):
        for start in range(0, count, batch_size):
            b = min(batch_size, count - start)
            x = torch.randn(b, 3, h, w, device=device)
            sync(device)
            t0 = time.perf_counter()
            # The same autocast the Backbone applies below float32.
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            ):
                backbone.net(x)
            sync(device)
            total += time.perf_counter() - t0
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "images", nargs="?", type=Path, default=DEFAULT_IMAGES, help="folder or list file"
    )
    ap.add_argument("-n", type=int, default=8, help="number of images (first N, sorted)")
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--weights", default="random", help="speed does not depend on the weights")
    ap.add_argument("--layer", default="pool5")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=DEFAULT_NUM_WORKERS, help="decoding threads")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="selret-bench-"))
    if args.images.exists():
        paths, source = list_images(args.images)[: args.n], str(args.images)
    else:
        paths, source = synthetic_images(tmp, args.n), "synthetic 1024 x 768 JPEGs"
    backbone = load_backbone(args.weights, args.layer, device=args.device, dtype=args.dtype)
    device = backbone.device
    results: dict = {
        "images": source,
        "n": len(paths),
        "backbone": cache_id(backbone),
        "max_side": args.max_side,
        "batch_size": args.batch_size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "decode_workers": args.workers,
        "torch": torch.__version__,
    }
    print(f"{len(paths)} images from {source}; {cache_id(backbone)} on {results['device']}, "
          f"{args.threads} torch threads, {args.workers} decode workers")  # fmt: skip

    if device.type == "cuda":  # cuDNN picks its algorithms on the first call: keep that out
        time_raw_forward(backbone, [(768, 1024)], 1, backbone.dtype)
        torch.cuda.reset_peak_memory_stats(device)

    cache = FeatureCache(tmp / "cache")
    cpu0 = time.process_time()
    report = extract_to_cache(
        paths, backbone, cache, max_side=args.max_side, batch_size=args.batch_size,
        progress=False, num_workers=args.workers,
    )  # fmt: skip
    if report.failed:
        print("failed:", *report.failed, sep="\n  ")
    keys = [cache.key(p, cache_id(backbone), args.max_side) for p in paths]
    shapes = [fm.image_size for fm in map(cache.get, keys) if fm is not None]
    e2e, e2e_cpu = report.seconds, time.process_time() - cpu0
    results["end_to_end"] = {
        "seconds": e2e,
        "cpu_seconds": e2e_cpu,
        "images_per_s": report.n_extracted / e2e,
        "peak_rss_mib": peak_rss_mib(),
        "input_sizes": sorted({f"{w}x{h}" for h, w in shapes}),
    }
    if device.type == "cuda":
        results["end_to_end"]["peak_cuda_mib"] = cuda_peak_mib(device)
        torch.cuda.reset_peak_memory_stats(device)

    cpu0 = time.process_time()
    raw = time_raw_forward(backbone, shapes, args.batch_size, backbone.dtype)
    raw_cpu = time.process_time() - cpu0
    results["raw_forward"] = {
        "seconds": raw,
        "cpu_seconds": raw_cpu,
        "images_per_s": len(shapes) / raw,
        "peak_rss_mib": peak_rss_mib(),
    }
    if device.type == "cuda":
        results["raw_forward"]["peak_cuda_mib"] = cuda_peak_mib(device)
    results["end_to_end_over_raw_time"] = e2e / raw
    # CPU seconds (all threads) are what to compare on a shared machine, where wall time is noise.
    results["end_to_end_over_raw_cpu"] = e2e_cpu / raw_cpu

    e, r = results["end_to_end"], results["raw_forward"]
    for label, m in (("end to end ", e), ("raw forward", r)):
        print(
            f"{label}: {m['images_per_s']:.3f} images/s ({m['seconds']:.1f} s wall, "
            f"{m['cpu_seconds']:.1f} s CPU), peak RSS {m['peak_rss_mib']:.0f} MiB"
        )
    print(
        f"end-to-end / raw-forward: {results['end_to_end_over_raw_time']:.2f} (wall), "
        f"{results['end_to_end_over_raw_cpu']:.2f} (CPU)"
    )

    if device.type == "cuda":
        results["cuda_grid"] = cuda_grid(backbone, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def cuda_grid(backbone, args) -> list[dict]:
    """Bare forward at 1024 x 768 for each precision and batch size: images/s and peak memory."""
    rows = []
    device = backbone.device
    for name, dtype in (
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
    ):
        for bs in (1, 4, 8, 16):
            time_raw_forward(backbone, [(768, 1024)] * bs, bs, dtype)  # warm-up at this shape
            torch.cuda.reset_peak_memory_stats(device)
            reps = 3
            seconds = time_raw_forward(backbone, [(768, 1024)] * (bs * reps), bs, dtype)
            row = {
                "dtype": name,
                "batch_size": bs,
                "images_per_s": bs * reps / seconds,
                "peak_cuda_mib": cuda_peak_mib(device),
            }
            rows.append(row)
            print(f"raw forward {name:8s} batch {bs:2d}: {row['images_per_s']:7.1f} images/s, "
                  f"peak {row['peak_cuda_mib']:.0f} MiB")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
