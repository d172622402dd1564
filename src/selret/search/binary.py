"""Compact binary codes: one bit per projected dimension, searched by Hamming distance.

:class:`BinaryEncoder` turns a float vector into ``n_bits`` bits, the signs of
``(x - mean_) @ projection_``, packed 8 to a byte (512-D float32 vectors, 2048 bytes, become 64
bytes with 512 bits). The projection is one of

* ``"none"``: the vector's own first ``n_bits`` coordinates (the sign of the centred vector);
* ``"random"``: a random orthogonal projection (sign-random-projection LSH), seeded;
* ``"pca"``: the ``n_bits`` leading principal directions of the training vectors;
* ``"itq"``: those directions followed by the rotation of *iterative quantization* (Gong and
  Lazebnik, CVPR 2011), learned to minimise the distance between the projected vectors and their
  binary codes, which balances the variance between the bits.

:class:`HammingShortlist` holds the codes of a collection under int64 labels (faiss
``IndexBinaryFlat``: exact Hamming k-NN by popcount) and returns, for a query, the labels of its
``n`` nearest codes: the short list that :mod:`selret.search.refined` re-ranks exactly with the float
vectors (``VectorIndex(kind="binary")``).
"""

from __future__ import annotations

import faiss
import numpy as np

from selret.encoding.postprocessing import Rotation

__all__ = [
    "BINARY_ROTATIONS",
    "BinaryEncoder",
    "BinaryShortlist",
    "HammingShortlist",
    "hamming_distances",
]

BINARY_ROTATIONS = ("none", "random", "pca", "itq")

_CHUNK = 65_536  # vectors projected at once when adding

MAX_TRAIN = 10_000
"""Training vectors a :class:`BinaryShortlist` fits its encoder on, at most."""


def _orthogonal(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """(n, m) with orthonormal columns, m <= n, Haar-distributed (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, m)))
    return q * np.sign(np.diag(r))


class BinaryEncoder:
    """Float vectors -> packed binary codes, ``sign((x - mean_) @ projection_)``.

    Parameters
    ----------
    n_bits : code length, a multiple of 8 and at most the vector dimension D (default D).
    rotation : ``"none"``, ``"random"``, ``"pca"`` or ``"itq"`` (see the module docstring).
    n_iter : ITQ iterations (each: the codes for the current rotation, then the best rotation for
        those codes, an orthogonal Procrustes problem solved by one SVD).
    seed : seed of the random projection and of ITQ's initial rotation.

    Attributes after :meth:`fit`: ``mean_`` (D,), ``projection_`` (D, n_bits) float32,
    ``n_bits_``. A bit is 1 where the projection is > 0; bits are packed big-end first
    (``numpy.packbits``), which faiss's Hamming distance does not care about.
    """

    def __init__(
        self, n_bits: int | None = None, rotation: str = "itq", n_iter: int = 50, seed: int = 0
    ):
        self.n_bits = n_bits
        self.rotation = rotation
        self.n_iter = n_iter
        self.seed = seed

    def check(self, dim: int) -> int:
        """The code length for ``dim``-D vectors, or a ValueError if the settings cannot work."""
        if self.rotation not in BINARY_ROTATIONS:
            raise ValueError(f"rotation must be one of {BINARY_ROTATIONS}, got {self.rotation!r}")
        n_bits = dim if self.n_bits is None else self.n_bits
        if int(n_bits) != n_bits or n_bits < 8 or n_bits % 8 or n_bits > dim:
            raise ValueError(f"n_bits must be a multiple of 8 in [8, {dim}], got {self.n_bits!r}")
        return int(n_bits)

    def fit(self, x: np.ndarray) -> BinaryEncoder:
        """Learn the mean and the projection from training vectors ``x`` (N, D), N >= 2."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"BinaryEncoder.fit needs (N >= 2, D) vectors, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("BinaryEncoder.fit got NaN or infinite values")
        dim = x.shape[1]
        n_bits = self.check(dim)
        rng = np.random.default_rng(self.seed)
        self.mean_ = x.mean(axis=0)
        if self.rotation == "none":
            projection = np.eye(dim, n_bits)
        elif self.rotation == "random":
            projection = _orthogonal(dim, n_bits, rng)
        else:  # PCA keeps the directions of most variance (completed when N <= D)
            projection = Rotation().fit(x).P_[:, :n_bits]
            if self.rotation == "itq":
                projection = projection @ _itq_rotation(
                    (x - self.mean_) @ projection, self.n_iter, rng
                )
        self.projection_ = np.ascontiguousarray(projection, dtype=np.float32)
        self.mean_ = self.mean_.astype(np.float32)
        self.n_bits_ = n_bits
        return self

    def project(self, x: np.ndarray) -> np.ndarray:
        """The real values whose signs are the bits: ``(x - mean_) @ projection_``, (n, n_bits)."""
        if not hasattr(self, "projection_"):
            raise ValueError("this BinaryEncoder is not fitted yet: call fit() first")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.mean_):
            raise ValueError(f"expected (n, {len(self.mean_)}) vectors, got shape {x.shape}")
        return (x - self.mean_) @ self.projection_

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Packed codes (n, n_bits / 8) uint8 of vectors ``x`` (n, D)."""
        return np.packbits(self.project(x) > 0, axis=1)

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)

    def get_state(self) -> dict[str, np.ndarray]:
        """The learned state as arrays (for an npz file); :meth:`from_state` reads it back."""
        return {
            "mean": self.mean_,
            "projection": self.projection_,
            "config": np.array([self.n_bits_, BINARY_ROTATIONS.index(self.rotation)]),
            "fit": np.array([self.n_iter, self.seed]),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> BinaryEncoder:
        n_bits, rotation = (int(v) for v in state["config"])
        n_iter, seed = (int(v) for v in state["fit"])
        encoder = cls(n_bits, BINARY_ROTATIONS[rotation], n_iter, seed)
        encoder.mean_ = np.asarray(state["mean"], np.float32)
        encoder.projection_ = np.ascontiguousarray(state["projection"], np.float32)
        encoder.n_bits_ = n_bits
        return encoder


def _itq_rotation(v: np.ndarray, n_iter: int, rng: np.random.Generator) -> np.ndarray:
    """ITQ: the orthogonal R (b, b) that (locally) minimises ||sign(v R) - v R||_F for v (N, b).

    Alternates the codes B = sign(v R) and the Procrustes solution for fixed codes: with
    v^T B = U S W^T, R = U W^T maximises trace(R^T v^T B).
    """
    rotation = _orthogonal(v.shape[1], v.shape[1], rng)
    for _ in range(n_iter):
        codes = np.where(v @ rotation > 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(v.T @ codes)
        rotation = u @ wt
    return rotation


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(na, nb) Hamming distances between packed codes a (na, B) and b (nb, B), uint8 (numpy)."""
    a, b = np.asarray(a, np.uint8), np.asarray(b, np.uint8)
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=2, dtype=np.int32)


class HammingShortlist:
    """Packed codes under int64 labels; :meth:`search` returns the labels of the nearest codes.

    Exact Hamming k-NN (faiss ``IndexBinaryFlat``, popcount over every code: about 1M x 64-byte
    codes per 10 ms per thread); equal distances come in no guaranteed order.
    """

    def __init__(self, n_bits: int):
        self.n_bits = int(n_bits)
        self.index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(self.n_bits))

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, codes: np.ndarray, labels: np.ndarray) -> None:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.index.add_with_ids(codes, np.ascontiguousarray(labels, dtype=np.int64))

    def remove(self, labels: np.ndarray) -> None:
        self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(labels, np.int64)))

    def search(self, codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (nq, n) int32, labels (nq, n) int64) of the ``n`` nearest codes, -1 padded."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        return self.index.search(codes, n)

    def serialize(self) -> np.ndarray:
        return faiss.serialize_index_binary(self.index)

    @classmethod
    def deserialize(cls, data: np.ndarray) -> HammingShortlist:
        index = faiss.deserialize_index_binary(np.asarray(data, np.uint8))
        shortlist = cls(index.d)
        shortlist.index = index
        return shortlist


class BinaryShortlist:
    """Labels (row slots) of the vectors nearest a query in Hamming distance between their codes.

    The short list of the ``"binary"`` kind of :class:`~selret.search.vectors.VectorIndex`. Its
    :class:`BinaryEncoder` learns from at most :data:`MAX_TRAIN` vectors of the training batch
    (a seeded sample: ITQ's cost grows with N, its rotation hardly does past a few thousand).
    """

    kind = "binary"
    knob = "k_factor"  # the effort calibrated: how long the short list is

    def __init__(self, dim: int, n_bits: int | None, rotation: str, seed: int):
        self.dim = dim
        self.encoder = BinaryEncoder(n_bits, rotation, seed=seed)
        self.codes: HammingShortlist | None = None

    def train(self, x: np.ndarray) -> None:
        if len(x) > MAX_TRAIN:
            rng = np.random.default_rng(self.encoder.seed)
            x = x[np.sort(rng.choice(len(x), MAX_TRAIN, replace=False))]
        self.encoder.fit(x)
        self.codes = HammingShortlist(self.encoder.n_bits_)

    @property
    def settings(self) -> dict:
        bits = self.encoder.n_bits_
        return {"n_bits": bits, "rotation": self.encoder.rotation, "scan_bytes": bits // 8}

    def add(self, x: np.ndarray, slots: np.ndarray) -> None:
        for start in range(0, len(x), _CHUNK):  # bounds the float projection's memory
            part = slice(start, start + _CHUNK)
            self.codes.add(self.encoder.transform(x[part]), slots[part])

    def remove(self, slots: np.ndarray) -> None:
        self.codes.remove(slots)

    def reset(self) -> None:
        self.codes = HammingShortlist(self.encoder.n_bits_)

    def search(self, q: np.ndarray, n: int) -> np.ndarray:
        return self.codes.search(self.encoder.transform(q), n)[1]

    def state(self) -> dict[str, np.ndarray]:
        state = {f"encoder_{k}": v for k, v in self.encoder.get_state().items()}
        return {**state, "codes": self.codes.serialize()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        prefix = "encoder_"
        self.encoder = BinaryEncoder.from_state(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        self.codes = HammingShortlist.deserialize(state["codes"])
