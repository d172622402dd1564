"""Speed and peak memory of feature extraction, end to end versus the bare network forward.

Three figures, measured in one process on the same images:

- **extract**: ``Extractor.extract`` on real files into a fresh cache: decode, EXIF, resize to
  ``--max-side``, SIFT, VGG16 forward, atomic cache write (what ``selret extract`` does).
- **pipeline**: the maps alone, decoding and resizing in ``--workers`` threads overlapped with the
  network (``Extractor.prepare`` ahead of ``Extractor.forward``), no SIFT, no cache: what a GPU
  can be fed with. Its target on a GPU is at least 90% of the raw forward.
- **raw forward**: ``backbone.net`` on random tensors already on the device, of the same sizes and
  batches: the ceiling.

``--grid`` adds the raw forward at 1024 x 768 for each precision (float32, float16, bfloat16; CPU:
no float16), with and without ``channels_last``, at batch sizes 1..32, and the pipeline at each
precision's best setting with its ratio to that raw figure.

    python benchmarks/extract_speed.py                       # first 8 Paris6k images, CPU
    python benchmarks/extract_speed.py -n 4 --threads 2
    python benchmarks/extract_speed.py FOLDER --device cuda --grid --json out.json
    python benchmarks/extract_speed.py --synthetic -n 2 --max-side 64 --grid --batches 1,2  # smoke

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
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from selret.features.backbones import load_backbone, resolve_device
from selret.features.extractor import DEFAULT_NUM_WORKERS, Extractor, cache_id
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


def time_raw_forward(backbone, shapes: list[tuple[int, int]], batch_size: int) -> float:
    """Seconds for ``backbone.net`` on random inputs of ``shapes`` already on the device, batched
    like the extraction batches them (equal sizes together, ``batch_size`` at a time), in the
    backbone's precision and memory format."""
    device, dtype = backbone.device, backbone.dtype
    fmt = torch.channels_last if backbone.channels_last else torch.contiguous_format
    total = 0.0
    for (h, w), count in sorted(Counter(shapes).items()):
        for start in range(0, count, batch_size):
            b = min(batch_size, count - start)
            x = torch.randn(b, 3, h, w, device=device).contiguous(memory_format=fmt)
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


def run_pipeline(extractor: Extractor, paths: list[Path], workers: int) -> tuple[float, int]:
    """Maps of ``paths`` with decoding + resizing in ``workers`` threads running ahead of the
    network (a window of 4 batches in flight), equal-size images batched together. Returns (wall
    seconds, images done); the maps are copied back to the CPU as ``Extractor.forward`` returns
    them, so the figure includes the device-to-host copy."""
    bs = extractor.batch_size
    pending: dict[tuple, list[np.ndarray]] = {}
    done = 0
    sync(extractor.backbone.device)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        window: deque = deque()
        it = iter(paths)

        def refill() -> None:
            while len(window) < 4 * bs:
                path = next(it, None)
                if path is None:
                    return
                window.append(pool.submit(extractor.prepare, path))

        def flush(size) -> int:
            batch = pending.pop(size)
            return sum(not isinstance(r, Exception) for r in extractor.forward(batch))

        refill()
        while window:
            rgb = window.popleft().result().rgb
            refill()
            group = pending.setdefault(rgb.shape, [])
            group.append(rgb)
            if len(group) == bs:
                done += flush(rgb.shape)
        for size in list(pending):
            done += flush(size)
    sync(extractor.backbone.device)
    return time.perf_counter() - t0, done


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "images", nargs="?", type=Path, default=DEFAULT_IMAGES, help="folder or list file"
    )
    ap.add_argument("-n", type=int, default=8, help="number of images (first N, sorted)")
    ap.add_argument("--synthetic", action="store_true", help="generated 1024 x 768 JPEGs")
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--weights", default="random", help="speed does not depend on the weights")
    ap.add_argument("--layer", default="pool5")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="NHWC activations [default: on for CUDA below float32]")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=DEFAULT_NUM_WORKERS, help="decoding threads")
    ap.add_argument("--grid", action="store_true", help="precision x channels_last x batch grid")
    ap.add_argument("--batches", default="1,2,4,8,16,32", help="batch sizes of the grid")
    ap.add_argument("--grid-images", type=int, default=64, help="images per grid pipeline run")
    ap.add_argument("--skip-extract", action="store_true", help="no SIFT + cache-write figure")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="selret-bench-"))
    if args.images.exists() and not args.synthetic:
        paths, source = list_images(args.images)[: args.n], str(args.images)
    else:
        paths, source = synthetic_images(tmp, args.n), "synthetic 1024 x 768 JPEGs"
    backbone = load_backbone(
        args.weights, args.layer, device=args.device, dtype=args.dtype,
        channels_last=args.channels_last,
    )  # fmt: skip
    device = backbone.device
    extractor = Extractor(
        args.weights, args.layer, args.max_side, cache=tmp / "cache", backbone=backbone,
        batch_size=args.batch_size, num_workers=args.workers,
    )  # fmt: skip
    results: dict = {
        "images": source,
        "n": len(paths),
        "backbone": cache_id(backbone),
        "channels_last": backbone.channels_last,
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
        time_raw_forward(backbone, [(768, 1024)], 1)
        torch.cuda.reset_peak_memory_stats(device)

    shapes = [extractor.prepare(p).rgb.shape[:2] for p in paths]
    if not args.skip_extract:
        cpu0 = time.process_time()
        report = extractor.extract(paths, progress=False)
        if report.failed:
            print("failed:", *report.failed, sep="\n  ")
        results["extract"] = measure(report.seconds, time.process_time() - cpu0,
                                     report.n_extracted, device)  # fmt: skip

    cpu0 = time.process_time()
    seconds, done = run_pipeline(extractor, paths, args.workers)
    results["pipeline"] = measure(seconds, time.process_time() - cpu0, done, device)

    cpu0 = time.process_time()
    raw = time_raw_forward(backbone, shapes, args.batch_size)
    results["raw_forward"] = measure(raw, time.process_time() - cpu0, len(shapes), device)
    results["input_sizes"] = sorted({f"{w}x{h}" for h, w in shapes})

    raw_rate = results["raw_forward"]["images_per_s"]
    for label in ("extract", "pipeline", "raw_forward"):
        if label in results:
            m = results[label]
            m["over_raw"] = m["images_per_s"] / raw_rate
            print(
                f"{label:11s}: {m['images_per_s']:8.3f} images/s = {m['over_raw']:5.2f} x raw "
                f"({m['seconds']:.1f} s wall, {m['cpu_seconds']:.1f} s CPU), "
                f"peak RSS {m['peak_rss_mib']:.0f} MiB"
                + (f", peak CUDA {m['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in m else "")
            )

    if args.grid:
        batches = [int(b) for b in args.batches.split(",")]
        results["grid"] = grid(args, batches, tmp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def measure(seconds: float, cpu_seconds: float, n: int, device: torch.device) -> dict:
    row = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
        "peak_rss_mib": peak_rss_mib(),
    }
    if device.type == "cuda":
        row["peak_cuda_mib"] = cuda_peak_mib(device)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def grid(args, batches: list[int], tmp: Path) -> list[dict]:
    """Raw forward at 1024 x 768 (scaled to ``--max-side``) for each precision, memory format and
    batch size; then, per precision, the overlapped pipeline on ``--grid-images`` synthetic JPEGs
    at that precision's fastest setting, as a fraction of that raw figure."""
    device = resolve_device(args.device)
    dtypes = ["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    scale = args.max_side / 1024
    size = (round(768 * scale), args.max_side)
    (tmp / "grid").mkdir(exist_ok=True)
    images = synthetic_images(tmp / "grid", args.grid_images, seed=1)
    rows = []
    print(f"grid: raw forward at {size[1]} x {size[0]}, images/s")
    for dtype in dtypes:
        best = None
        for channels_last in (False, True):
            backbone = load_backbone(args.weights, args.layer, device=device, dtype=dtype,
                                     channels_last=channels_last)  # fmt: skip
            for bs in batches:
                time_raw_forward(backbone, [size] * bs, bs)  # warm-up at this shape
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                reps = 3 if device.type == "cuda" else 1
                seconds = time_raw_forward(backbone, [size] * (bs * reps), bs)
                row = {"dtype": dtype, "channels_last": channels_last, "batch_size": bs,
                       "raw_images_per_s": bs * reps / seconds}  # fmt: skip
                if device.type == "cuda":
                    row["peak_cuda_mib"] = cuda_peak_mib(device)
                rows.append(row)
                print(f"  {dtype:8s} {'NHWC' if channels_last else 'NCHW'} batch {bs:2d}: "
                      f"{row['raw_images_per_s']:8.2f}")  # fmt: skip
                if best is None or row["raw_images_per_s"] > best[0]["raw_images_per_s"]:
                    best = (row, backbone)
        row, backbone = best
        extractor = Extractor(
            args.weights, args.layer, args.max_side, cache=tmp / "grid-cache", backbone=backbone,
            batch_size=row["batch_size"], num_workers=args.workers,
        )  # fmt: skip
        seconds, done = run_pipeline(extractor, images, args.workers)
        row["pipeline_images_per_s"] = done / seconds
        row["pipeline_over_raw"] = row["pipeline_images_per_s"] / row["raw_images_per_s"]
        print(f"  pipeline {dtype} at its best ({'NHWC' if row['channels_last'] else 'NCHW'}, "
              f"batch {row['batch_size']}): {row['pipeline_images_per_s']:.2f} images/s = "
              f"{row['pipeline_over_raw']:.2f} x raw")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
