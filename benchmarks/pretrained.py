"""Refit the shipped pre-trained encoders from ../shared/data and check them against the package.

    python benchmarks/pretrained.py --cache /work/selret-cache            # refit into runs/, compare
    python benchmarks/pretrained.py --cache /work/selret-cache --install  # refit, then ship them

Each encoder is made by one ``selret fit`` command (printed, and recorded in the file's header) on
all of ``landmarks-learn`` at its own size (see benchmarks/RESULTS.md for why), stored in float16.
The comparison with the shipped file is bit for bit when the fingerprints match; otherwise it
encodes the paris6k-250 maps with both and reports the largest difference, which must stay below
``--tolerance`` (1e-3: float16 storage rounds at about 5e-4 relative, and k-means / eigen-solvers
may round differently on another CPU or BLAS). ``--install`` copies the refitted files into
``src/selret/encoding/pretrained_encoders/`` and rewrites its ``index.json`` with their sha256.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = ROOT / "src" / "selret" / "encoding" / "pretrained_encoders"
LEARN = Path("../shared/data/landmarks-learn")  # relative: the recorded command reads the same
DEFAULT = "landmarks-max-512"
#: name -> (mask, preset, description)
SHIPPED = {
    "landmarks-max-512": (
        "max",
        "temb-demo-512",
        "MAX-mask T-emb + democratic, 512-D; the default",
    ),
    "landmarks-max-1024": ("max", "temb-demo-1024", "MAX-mask T-emb + democratic, 1024-D"),
    "landmarks-sum-512": ("sum", "temb-demo-512", "SUM-mask T-emb + democratic, 512-D"),
    "landmarks-sum-1024": ("sum", "temb-demo-1024", "SUM-mask T-emb + democratic, 1024-D"),
    "landmarks-none-512": ("none", "temb-demo-512", "no mask, 512-D: the ablation reference"),
}


def fit_command(name: str, out: Path, cache: Path) -> list[str]:
    mask, preset, _ = SHIPPED[name]
    return ["selret", "fit", str(LEARN), "--preset", preset, "--mask", mask, "--no-upscale",
            "--precision", "float16", "--out", str(out), "--cache", str(cache)]  # fmt: skip


def compare(refit: Path, shipped: Path, maps) -> str:
    from selret.encoding.encoder import Encoder

    a, b = Encoder.load(refit), Encoder.load(shipped)
    if a.fingerprint == b.fingerprint:
        return "identical (same fingerprint)"
    diff = max(float(np.abs(a.encode(m) - b.encode(m)).max()) for m in maps)
    return f"max |difference| of encoded vectors {diff:.2e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="Feature cache (maps are reused).")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "pretrained")
    ap.add_argument("--names", default=",".join(SHIPPED))
    ap.add_argument("--install", action="store_true", help="Ship the refitted files.")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.names.split(",")
    selret = [str(Path(sys.executable).with_name("selret"))]
    for name in names:
        cmd = fit_command(name, args.out / f"{name}.npz", args.cache)
        print("$", " ".join(cmd), flush=True)
        subprocess.run(selret + cmd[1:], check=True, cwd=ROOT)
    if args.install:
        install(names, args.out)
        return 0
    from selret.evaluation.datasets import load_benchmark
    from selret.features.extractor import Extractor

    bench = load_benchmark("paris6k-250", ROOT.parent / "shared" / "data" / "paris6k-250")
    paths = [bench.image_path(i) for i in range(0, len(bench), 10)]
    maps = list(Extractor(cache=args.cache).maps(paths, progress=False))
    worst = 0.0
    for name in names:
        shipped = SHIPPED_DIR / f"{name}.npz"
        verdict = (
            compare(args.out / f"{name}.npz", shipped, maps) if shipped.exists() else "not shipped"
        )
        print(f"{name}: {verdict}")
        if verdict.startswith("max"):
            worst = max(worst, float(verdict.rsplit(" ", 1)[1]))
    return 0 if worst <= args.tolerance else 1


def install(names: list[str], folder: Path) -> None:
    from selret.encoding.encoder import Encoder
    from selret.files import atomic_write_text, sha256_of

    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    index_path = SHIPPED_DIR / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"encoders": {}}
    index["default"] = DEFAULT
    for name in names:
        target = SHIPPED_DIR / f"{name}.npz"
        shutil.copyfile(folder / f"{name}.npz", target)
        enc = Encoder.load(target)
        index["encoders"][name] = {
            "file": target.name, "sha256": sha256_of(target), "dim": enc.dim,
            "mask": enc.config.mask, "description": SHIPPED[name][2],
        }  # fmt: skip
        print(f"installed {target} ({target.stat().st_size / 1e6:.1f} MB)")
    atomic_write_text(index_path, json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
