"""Vectors for the search benchmarks (``search_speed.py``, ``search_map.py``): real selret vectors of
the real data sets, synthetic distractors that match their statistics, and isotropic ones.

* **real**: the default pre-trained encoder (``landmarks-max-512``) on the pool5 maps of
  paris6k-250 at 1024 px (the evaluated images) and of a *fit set* disjoint from Paris: UKBench-56
  and SMVS DVD covers (references and the Canon and Droid phone photos) at 512 px. Maps come from
  (and missing ones go to) feature caches; the encoded vectors are cached in ``--work-dir``.
* **realistic** synthetic vectors: draws of a Gaussian with the mean and the Ledoit-Wolf-shrunk
  covariance of real vectors, l2-normalised as selret vectors are (:func:`distractor_model`):
  by default of the fit set only (``"fit"``: photos unrelated to Paris, as distractor sets are),
  or of the fit set and the Paris images pooled (``"pooled"``: an adversarial set that puts the
  distractors in the evaluated landmarks' own subspace). Ledoit-Wolf, because a few hundred
  samples in 512 dimensions leave the smallest sample eigenvalues near zero, which would make the
  draws look lower-dimensional (and easier to search) than they are. Second moments only: the
  draws have none of the near-duplicates and tight clusters of real collections.
* **isotropic**: uniform on the sphere, the worst case for approximate search.

Large synthetic sets are written once to ``--work-dir`` as ``.npy`` files and memory-mapped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ENCODER = "landmarks-max-512"
_CHUNK = 50_000


@dataclass
class RealVectors:
    """Encoded real vectors: ``paris`` (250, D) in benchmark order, ``fit`` (n, D) of the fit set."""

    paris: np.ndarray
    fit: np.ndarray
    source: str


def _fit_set_paths(data: Path) -> list[Path]:
    paths = sorted((data / "ukbench-56" / "jpg").glob("*.jpg"))
    for sub in ("Reference", "Canon", "Droid"):
        paths += sorted((data / "smvs-dvd-covers" / sub).glob("*.jpg"))
    return paths


def real_vectors(work_dir: Path, paris_cache: Path, fit_cache: Path, data: Path = DATA):
    """The real vectors (encoded once, then read from ``work_dir``); None without the data."""
    cached = work_dir / f"real-{ENCODER}.npz"
    if cached.exists():
        z = np.load(cached)
        return RealVectors(z["paris"], z["fit"], str(z["source"]))
    if not (data / "paris6k-250").exists():
        return None
    from selret.encoding.encoder import Encoder
    from selret.evaluation.data import prepare
    from selret.evaluation.datasets import load_benchmark
    from selret.evaluation.runs import encode_data
    from selret.features.extractor import Extractor

    start = time.perf_counter()
    encoder = Encoder.pretrained(ENCODER)
    paris = prepare(
        load_benchmark(data / "paris6k-250", protocol="loo"), max_side=1024, cache_dir=paris_cache
    )
    paris_vecs = encode_data(encoder, paris)[0]
    paths = _fit_set_paths(data)
    maps = Extractor("vgg16-caffe", "pool5", 512, cache=fit_cache).maps(paths, progress=False)
    fit_vecs = encoder.encode_many(maps).astype(np.float32)
    source = (
        f"{ENCODER} vectors of paris6k-250 (250 images, 1024 px) and of a fit set disjoint from "
        f"Paris ({len(fit_vecs)} images: ukbench-56, SMVS references + Canon + Droid, 512 px)"
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cached, paris=paris_vecs, fit=fit_vecs, source=np.array(source))
    print(f"# encoded the real vectors in {time.perf_counter() - start:.0f} s -> {cached}")
    return RealVectors(paris_vecs, fit_vecs, source)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class GaussianModel:
    """Mean and Ledoit-Wolf covariance of real vectors; :meth:`sample` draws unit vectors."""

    def __init__(self, real: np.ndarray, label: str):
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(np.asarray(real, np.float64))
        self.mean = lw.location_.astype(np.float32)
        eigenvalues, basis = np.linalg.eigh(lw.covariance_)
        self.eigenvalues = np.maximum(eigenvalues[::-1], 0)  # decreasing
        self.root = (basis[:, ::-1] * np.sqrt(self.eigenvalues)).astype(np.float32)
        self.shrinkage = float(lw.shrinkage_)
        self.n_real, self.label = len(real), label
        self.key = hashlib.sha256(np.asarray(real, np.float32).tobytes()).hexdigest()[:10]

    def describe(self) -> str:
        share = self.eigenvalues / self.eigenvalues.sum()
        tops = ", ".join(f"{share[:k].sum():.2f}" for k in (10, 50, 100, 200))
        return (
            f"Gaussian with the mean (norm {np.linalg.norm(self.mean):.2f}) and Ledoit-Wolf covariance "
            f"(shrinkage {self.shrinkage:.2f}) of {self.n_real} real vectors ({self.label}), "
            f"l2-normalised; variance share of the top 10/50/100/200 directions: {tops}"
        )

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((n, len(self.mean)), np.float32)
        for start in range(0, n, _CHUNK):
            block = rng.standard_normal((min(_CHUNK, n - start), len(self.mean)), np.float32)
            out[start : start + len(block)] = _unit_rows(block @ self.root.T + self.mean)
        return out


MODELS = ("fit", "pooled")


def distractor_model(real: RealVectors, which: str) -> GaussianModel:
    """The Gaussian of ``"fit"`` (fit-set vectors only) or ``"pooled"`` (fit set + Paris)."""
    if which == "fit":
        return GaussianModel(real.fit, f"{len(real.fit)} fit-set vectors, disjoint from Paris")
    pooled = np.concatenate([real.paris, real.fit])
    return GaussianModel(pooled, f"{len(pooled)} vectors: paris6k-250 and the fit set pooled")


def isotropic(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, _CHUNK):
        block = rng.standard_normal((min(_CHUNK, n - start), dim), np.float32)
        out[start : start + len(block)] = _unit_rows(block)
    return out


def synthetic(
    kind: str, n: int, dim: int, seed: int, work_dir: Path, model: GaussianModel | None = None
) -> np.ndarray:
    """``n`` synthetic unit vectors (``"realistic"`` draws of ``model``, or ``"isotropic"``), the
    same for the same arguments: sets of 100k vectors and more are cached in ``work_dir``."""
    rng = np.random.default_rng(seed)
    tag = f"{kind}-{model.key}" if kind == "realistic" else kind
    path = work_dir / f"synthetic-{tag}-{n}x{dim}-seed{seed}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    x = model.sample(n, rng) if kind == "realistic" else isotropic(n, dim, rng)
    if n >= 100_000:
        work_dir.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part.npy")
        np.save(part, x)
        part.replace(path)
    return x
