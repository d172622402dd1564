"""Draft JPEG decoding (libjpeg's 1/2, 1/4, 1/8 DCT scaling) against the full decode, on real photos.

For each photo and network size: the network-input pixels (mean and max absolute difference, PSNR),
the VGG16 pool5 map (relative L2 difference) and the sum- and max-pooled global descriptors (cosine),
and the decode + resize time of both. The draft reduction only applies where the photo is at
least twice the network size, so the Paris photos (1024 px) show it at 512 px (1/2) and 256 px (1/4).

    python benchmarks/draft_decode.py [--images DIR] [--n 8] [--sizes 512,256] [--weights vgg16-caffe]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from selret.features.backbones import load_backbone
from selret.features.io import prepare_image


def _timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/data/paris6k-250/jpg"))
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--sizes", default="512,256")
    parser.add_argument("--weights", default="vgg16-caffe")
    args = parser.parse_args()
    photos = sorted(args.images.rglob("*.jpg"))[:: max(1, 250 // args.n)][: args.n]
    backbone = load_backbone(args.weights, "pool5", device="cpu")
    print(f"{len(photos)} photos from {args.images}, weights {args.weights}")
    print(
        "size | pixel MAE | pixel max | PSNR dB | map rel. L2 | cos sum | cos max | full ms | draft ms"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        rows = []
        for photo in photos:
            full, t_full = _timed(lambda p=photo, s=size: prepare_image(p, max_side=s))
            draft, t_draft = _timed(
                lambda p=photo, s=size: prepare_image(p, max_side=s, draft=True)
            )
            assert full.size == draft.size
            diff = np.abs(full.rgb.astype(np.float64) - draft.rgb)
            mse = float((diff**2).mean())
            maps = backbone.forward_maps(np.stack([full.rgb, draft.rgb]))
            f, d = maps[0].astype(np.float64), maps[1].astype(np.float64)
            rows.append([
                diff.mean(), diff.max(), 10 * np.log10(255**2 / max(mse, 1e-12)),
                np.linalg.norm(f - d) / np.linalg.norm(f),
                float(_unit(f.sum(axis=(1, 2))) @ _unit(d.sum(axis=(1, 2)))),
                float(_unit(f.max(axis=(1, 2))) @ _unit(d.max(axis=(1, 2)))),
                1000 * t_full, 1000 * t_draft,
            ])  # fmt: skip
        r = np.array(rows)
        mean, worst = r.mean(axis=0), [r[:, 0].max(), r[:, 1].max(), r[:, 2].min(),
                                       r[:, 3].max(), r[:, 4].min(), r[:, 5].min()]  # fmt: skip
        print(
            f"{size} mean | {mean[0]:.2f} | {mean[1]:.0f} | {mean[2]:.1f} | {mean[3]:.4f} | "
            f"{mean[4]:.5f} | {mean[5]:.5f} | {mean[6]:.1f} | {mean[7]:.1f}"
        )
        print(
            f"{size} worst | {worst[0]:.2f} | {worst[1]:.0f} | {worst[2]:.1f} | {worst[3]:.4f} | "
            f"{worst[4]:.5f} | {worst[5]:.5f} | |"
        )


if __name__ == "__main__":
    main()
