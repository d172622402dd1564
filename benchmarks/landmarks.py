"""Landmark-learned encoders at 1024 px: the evidence behind the shipped pre-trained encoders.

Every learned parameter comes from ``landmarks-learn`` (1,171 building/landmark photos, none from
Paris); evaluation is on paris6k-250 (loo and official-12) and, where its maps are cached,
UKBench-56. Prints markdown tables (and appends them to ``--out``), one per study:

  sizes      learning-set extraction: up-scaled to 1024 px vs each photo at its own size
  baselines  SPoC, MAC, GeM, R-MAC, CroW (and plain sum pooling), raw and PCA-whitened on landmarks
  method     SIFT / SUM / MAX / no mask x T-emb + democratic at 512 / 1024 / 4096-D
  curve      MAX 512-D against the number of learning images (150, 300, 600, all)
  qe         average query expansion (1..10 neighbours) on the best setting
  fp16       float32 fit against the shipped float16 file (with --reuse-encoders)
  adapt      product option, NOT the paper's protocol: fit on the evaluated collection itself

    python benchmarks/landmarks.py --cache /work/selret-cache --studies baselines,method \
        --save-encoders runs/landmark-encoders

Maps come from (and missing ones go to) ``--cache``; 1024-px extraction of the learning set costs
about 1.5 h on a 2-core CPU, so run it once into a persistent cache. Learning-set subsets are drawn
with a fixed seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.evaluation.baselines import BaselineEncoder
from selret.evaluation.data import prepare
from selret.evaluation.datasets import load_benchmark
from selret.evaluation.metrics import rank_by_inner_product
from selret.evaluation.runs import encode_data
from selret.evaluation.scoring import score
from selret.features.extractor import Extractor
from selret.files import list_images
from selret.numerics import l2_normalize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PRESETS = {512: "temb-demo-512", 1024: "temb-demo-1024", 4096: "temb-demo-4096"}


def learning_paths(data: Path, n: int | None, seed: int = 0) -> list[Path]:
    paths = list_images(data / "landmarks-learn")
    if n is None or n >= len(paths):
        return paths
    keep = np.sort(np.random.default_rng(seed).choice(len(paths), n, replace=False))
    return [paths[i] for i in keep]


class Bench:
    """The maps of one benchmark protocol, kept in memory for many methods."""

    def __init__(self, name: str, bench, cache: Path):
        self.name = name
        self.data = prepare(bench, max_side=1024, cache_dir=cache, preload=True, progress=False)

    def evaluate(self, method, qe: int = 0) -> dict:
        db, q, kept = encode_data(method, self.data)
        if qe:
            q = average_qe(q, db, qe)
        ranks = rank_by_inner_product(q, db)
        result = score(self.data.benchmark, ranks)
        return {"map": 100 * result["map"], "ns": result["ns_score"], "kept": kept}


def average_qe(q: np.ndarray, db: np.ndarray, n: int) -> np.ndarray:
    """Average query expansion: the query plus its top ``n`` database vectors, l2-normalised."""
    top = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :n]
    return l2_normalize(q + db[top].sum(axis=1))


def fit_encoder(maps, mask: str, dim: int, seed: int = 0) -> tuple[Encoder, float]:
    start = time.perf_counter()
    enc = Encoder(EncoderConfig.from_preset(PRESETS[dim], mask=mask, seed=seed)).fit(maps)
    return enc, time.perf_counter() - start


def table(title: str, header: list[str], rows: list[list], out: Path | None) -> None:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out is not None:
        with open(out, "a") as fh:
            fh.write(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument(
        "--studies",
        default="sizes,baselines,method,curve,qe,adapt",
        help="Comma-separated studies; add 'ukbench' to also evaluate on UKBench-56.",
    )
    ap.add_argument("--masks", default="max,sum,sift,none")
    ap.add_argument("--dims", default="512,1024,4096")
    ap.add_argument(
        "--upscale",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Learning set extracted up-scaled to 1024 (default: at its own size).",
    )
    ap.add_argument(
        "--sizes-subset",
        type=int,
        default=None,
        help="sizes study: only the first N learning images (both extractions needed).",
    )
    ap.add_argument("--save-encoders", type=Path, default=None)
    ap.add_argument(
        "--reuse-encoders",
        type=Path,
        nargs="*",
        default=[],
        help="method study: load landmarks-<mask>-<dim>.npz from these folders when present "
        "(e.g. the shipped ones) instead of fitting.",
    )
    ap.add_argument("--out", type=Path, default=None, help="Append the tables to this file.")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Threads for torch, faiss and BLAS (1 when other processes share the CPU).",
    )
    args = ap.parse_args()
    if args.threads:
        from selret.threads import set_threads

        set_threads(args.threads)
    studies = set(args.studies.split(","))
    masks, dims = args.masks.split(","), [int(d) for d in args.dims.split(",")]
    paris = args.data / "paris6k-250"
    benches = [
        Bench("paris loo", load_benchmark("paris6k-250", paris, "loo"), args.cache),
        Bench("paris official-12", load_benchmark("paris6k-250", paris, "official-12"), args.cache),
    ]
    ukb = args.data / "ukbench-56" / "jpg"
    if "ukbench" in args.studies:
        benches.append(Bench("ukbench-56", load_benchmark(ukb), args.cache))
    names = [b.name for b in benches] + (["ukbench-56 N-S"] if len(benches) > 2 else [])
    learn_all = learning_paths(args.data, None)
    source = (
        f"landmarks-learn ({'up-scaled to 1024' if args.upscale else 'own size, at most 1024'})"
    )

    def learn_maps(paths, upscale=args.upscale):
        ex = Extractor("vgg16-caffe", "pool5", 1024, upscale=upscale, cache=args.cache)
        return list(ex.maps(paths, progress=False))

    def row(label, method, extra=()):
        res = [b.evaluate(method) for b in benches]
        cells = [f"{r['map']:.1f}" for r in res]
        if any(r["ns"] is not None for r in res):
            cells += [f"{r['ns']:.2f}" for r in res if r["ns"] is not None]
        return [label, *extra, *cells], res

    if "sizes" in studies:
        paths = learn_all[: args.sizes_subset] if args.sizes_subset else learn_all
        rows = []
        for upscale in (True, False):
            maps = learn_maps(paths, upscale)
            for mask in ("max", "sum"):
                enc, secs = fit_encoder(maps, mask, 512)
                r, _ = row(
                    f"{mask} 512-D",
                    enc,
                    ("up-scaled to 1024" if upscale else "own size", len(maps)),
                )
                rows.append(r)
        table(
            "Learning-set extraction size (T-emb + democratic 512-D; paris6k-250 at 1024 px)",
            ["method", "learning images", "n", *names],
            rows,
            args.out,
        )

    maps_all = (
        learn_maps(learn_all) if studies & {"baselines", "method", "curve", "qe", "fp16"} else None
    )

    if "baselines" in studies:
        rows = []
        for name, params in [
            ("sum", {"centering": False}),
            ("spoc", {}),
            ("mac", {}),
            ("gem", {}),
            ("rmac", {}),
            ("crow", {}),
        ]:
            base = "spoc" if name == "sum" else name
            label = "sum pooling" if name == "sum" else name
            for whiten in (False, True):
                method = BaselineEncoder(base, whiten=whiten, label=label, **params)
                if whiten:
                    method.fit(maps_all)
                r, _ = row(label + (" + PCAw" if whiten else ""), method, ("512",))
                rows.append(r)
        table(
            f"Baselines on the same maps (PCA-whitening learned on {source})",
            ["method", "D", *names],
            rows,
            args.out,
        )

    best = None
    if "method" in studies:
        rows = []
        for dim in dims:
            for mask in masks:
                found = [d / f"landmarks-{mask}-{dim}.npz" for d in args.reuse_encoders]
                found = [f for f in found if f.is_file()]
                if found:
                    enc, secs = Encoder.load(found[0]), 0.0
                else:
                    enc, secs = fit_encoder(maps_all, mask, dim)
                r, res = row(
                    f"{mask}-mask",
                    enc,
                    (
                        enc.dim,
                        enc.rotation_.n_components_,
                        f"{100 * enc.kept_fraction_:.0f}%",
                        f"{secs:.0f}s",
                    ),
                )
                rows.append(r)
                if args.save_encoders is not None:
                    args.save_encoders.mkdir(parents=True, exist_ok=True)
                    enc.save(args.save_encoders / f"landmarks-{mask}-{dim}.npz")
                if best is None or res[0]["map"] > best[1]:
                    best = (enc, res[0]["map"], f"{mask} {dim}-D")
        table(
            f"T-emb + democratic, learned on {source}",
            ["mask", "D", "learned comps", "kept (learn)", "fit", *names],
            rows,
            args.out,
        )

    if "curve" in studies:
        rows = []
        for n in (150, 300, 600, len(learn_all)):
            paths = learning_paths(args.data, n)
            maps = [maps_all[learn_all.index(p)] for p in paths]
            enc, _ = fit_encoder(maps, "max", 512)
            rows.append(row(f"{n}", enc)[0])
        table(
            f"Learning-set size, MAX 512-D ({source}, random subsets, seed 0)",
            ["learning images", *names],
            rows,
            args.out,
        )

    if "qe" in studies:
        enc, _, label = best or (fit_encoder(maps_all, "max", 4096)[0], 0, "max 4096-D")
        rows = [
            [n, *[f"{b.evaluate(enc, qe=n)['map']:.1f}" for b in benches[:2]]]
            for n in (0, 1, 2, 3, 5, 7, 10)
        ]
        table(
            f"Average query expansion on {label} ({source})",
            ["QE neighbours", *names[:2]],
            rows,
            args.out,
        )

    if "fp16" in studies and args.reuse_encoders:
        rows = []
        for mask, dim in (("max", 512), ("max", 1024)):
            shipped = args.reuse_encoders[0] / f"landmarks-{mask}-{dim}.npz"
            if not shipped.is_file():
                continue
            full, _ = fit_encoder(maps_all, mask, dim)
            r32 = [b.evaluate(full)["map"] for b in benches[:2]]
            r16 = [b.evaluate(Encoder.load(shipped))["map"] for b in benches[:2]]
            rows.append(
                [
                    f"{mask} {dim}-D",
                    *[f"{a:.2f} / {b:.2f} ({b - a:+.2f})" for a, b in zip(r32, r16, strict=True)],
                ]
            )
        table(
            "float16 storage of the shipped encoders: mAP float32 fit / shipped float16 (change)",
            ["encoder", *names[:2]],
            rows,
            args.out,
        )

    if "adapt" in studies:
        rows = []
        for dim in (512, 1024):
            db = benches[0].data.db
            enc, _ = fit_encoder(list(db), "max", dim)
            rows.append(row(f"max {dim}-D", enc, ("paris6k-250 database itself (no labels)",))[0])
        table(
            "PRODUCT OPTION, not the paper's protocol: encoder fitted on the evaluated collection",
            ["method", "learning set", *names],
            rows,
            args.out,
        )


if __name__ == "__main__":
    main()
