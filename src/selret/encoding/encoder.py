"""The selective-feature encoder: one conv map -> one global vector (SPEC sections 2-7).

``Encoder`` chains the stages, each a module of its own:

    masks.compute_mask -> preprocessing.LocalPCA -> embeddings.Embedder
    -> aggregation.aggregate -> postprocessing.postprocess (with a learned Rotation)

``fit`` learns every parameter on a held-out set of feature maps, ``encode`` / ``encode_many`` apply
them, ``save`` / ``load`` keep everything (config and learned arrays) in one ``.npz`` file holding no
pickled code. All settings live in one serialisable ``EncoderConfig``.

``fit``, ``aggregate`` and ``postprocess`` go through the stage modules as written above;
``encode`` / ``encode_many`` run the same method batched, on parameters folded once per encoder
(``plan``, ``batched``): the results agree to float32 rounding.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from selret import __version__
from selret.encoding.aggregation import AGGREGATIONS, aggregate
from selret.encoding.batched import encode_local, select
from selret.encoding.embeddings import KINDS as EMBEDDINGS
from selret.encoding.embeddings import Embedder, embedding_dim
from selret.encoding.masks import MASKS, compute_mask
from selret.encoding.persistence import EncoderFileError, read_encoder, write_encoder
from selret.encoding.plan import EncodePlan, build_plan
from selret.encoding.postprocessing import Rotation, l2_normalize, postprocess
from selret.encoding.preprocessing import LocalPCA, check_is_fitted
from selret.encoding.presets import DEFAULT_PRESET, preset
from selret.features import FeatureMap
from selret.threads import single_threaded_blas

ROTATIONS = ("rotation", "whitening", "none")
_LEARNED = ("pca_", "embedder_", "rotation_")


class SmallLearningSetWarning(UserWarning):
    """The learning set has fewer images than the rotation has dimensions."""


@dataclass
class EncoderConfig:
    """Every setting of the pipeline, from the backbone to the final dimension.

    ``drop`` is the number of leading rotated components removed; None means the paper's choice:
    128 for T-emb, d(d+1) for F-FAemb, 0 for VLAD and FV (and 0 without rotation). ``dim`` (the final
    dimension D) follows from the rest.
    """

    weights: str = "vgg16-caffe"
    layer: str = "pool5"
    max_side: int = 1024
    mask: str = "max"
    d: int = 32
    k: int = 20
    embedding: str = "temb"
    aggregation: str = "democratic"
    alpha: float = 0.5
    rotation: str = "rotation"
    drop: int | None = None
    seed: int = 0
    kmeans_iters: int = 100
    kmeans_restarts: int = 2
    democratic_gamma: float = 0.5
    democratic_iters: int = 10
    # Bound on the local features used to learn PCA and the codebook (subsampled with the seed).
    max_train_features: int = 1_000_000
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        aggregation = {"demo": "democratic", "avg": "average", "mean": "average"}.get(
            self.aggregation, self.aggregation
        )
        self.aggregation = aggregation
        checks = (
            ("mask", self.mask, MASKS),
            ("embedding", self.embedding, EMBEDDINGS),
            ("aggregation", self.aggregation, AGGREGATIONS),
            ("rotation", self.rotation, ROTATIONS),
        )
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(valid)}")
        if self.d < 1 or self.k < 1:
            raise ValueError(f"d and k must be positive, got d={self.d}, k={self.k}")
        if self.drop is not None and self.drop < 0:
            raise ValueError(f"drop must be >= 0, got {self.drop}")
        if self.rotation == "none" and self.drop:
            raise ValueError("dropping leading components needs a rotation; set rotation or drop=0")
        if self.effective_drop >= self.embedding_dim:
            raise ValueError(
                f"drop={self.effective_drop} leaves nothing of {self.embedding_dim} dimensions"
            )

    @property
    def embedding_dim(self) -> int:
        return embedding_dim(self.embedding, self.k, self.d)

    @property
    def effective_drop(self) -> int:
        if self.drop is not None:
            return self.drop
        if self.rotation == "none":
            return 0
        return {"temb": 128, "faemb": self.d * (self.d + 1)}.get(self.embedding, 0)

    @property
    def dim(self) -> int:
        """Final dimension D of the encoded vectors."""
        return self.embedding_dim - self.effective_drop

    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, **overrides) -> EncoderConfig:
        fields = preset(name) | {k: v for k, v in overrides.items() if v is not None}
        return cls(**fields, preset=name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown encoder config fields: {', '.join(sorted(unknown))}")
        return cls(**data)


def encoding_device(device) -> torch.device | None:
    """Where :meth:`Encoder.encode` runs its per-feature stages: None (numpy on the CPU) for None,
    or for 'auto' on a machine without a GPU; otherwise that torch device."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(device)


MapSource = Sequence[FeatureMap] | Callable[[], Iterable[FeatureMap]]


def _iterate(maps: MapSource) -> Iterable[FeatureMap]:
    return maps() if callable(maps) else maps


class Encoder:
    """Feature maps -> global vectors, with learned parameters (scikit-learn style).

    Learned state: ``pca_`` (LocalPCA), ``embedder_`` (codebook and embedding whitening),
    ``rotation_`` (None when ``config.rotation == "none"``), ``n_train_images_``,
    ``n_train_features_``, ``kept_fraction_`` (mean fraction of local features the mask kept on the
    learning set).
    """

    def __init__(self, config: EncoderConfig | None = None):
        self.config = config

    @classmethod
    def from_params(cls, config: EncoderConfig | None = None, **overrides) -> Encoder:
        """An unfitted encoder of ``config`` (default: ``EncoderConfig()``) with fields replaced."""
        config = config or EncoderConfig()
        return cls(dataclasses.replace(config, **overrides) if overrides else config)

    # ------------------------------------------------------------------ stages

    @property
    def _cfg(self) -> EncoderConfig:
        # The constructor only stores its argument (scikit-learn convention); None means defaults.
        return self.config if self.config is not None else EncoderConfig()

    @property
    def dim(self) -> int:
        return self._cfg.dim

    def select(self, fmap: FeatureMap) -> np.ndarray:
        """(n, K) local features the mask keeps."""
        return fmap.local_features(compute_mask(self._cfg.mask, fmap))

    # ------------------------------------------------------------------ learning

    def fit(self, maps: MapSource, progress: bool = False) -> Encoder:
        """Learn PCA, codebook, embedding whitening and rotation from held-out feature maps.

        ``maps`` is a sequence of FeatureMap, or a callable returning a fresh iterable of them (it is
        read twice: the maps of a large learning set need not fit in memory).
        """
        c = self._cfg
        rng = np.random.default_rng(c.seed)
        # Pass 1: the masked local features of every learning image (PCA'd later, so the d-dim
        # copies are what stays in memory).
        selected: list[np.ndarray] = []
        fractions = []
        for fmap in _tqdm(_iterate(maps), progress, "fit: local features"):
            mask = compute_mask(c.mask, fmap)
            fractions.append(float(mask.mean()))
            selected.append(fmap.local_features(mask))
        if not selected:
            raise ValueError("cannot fit an encoder on zero feature maps")
        total = sum(len(s) for s in selected)
        if total < max(c.k, c.d):
            raise ValueError(
                f"the learning set gives {total} local features, fewer than needed for d={c.d}, k={c.k}; "
                "use more learning images"
            )
        train = np.concatenate(selected)
        if len(train) > c.max_train_features:
            train = train[np.sort(rng.choice(len(train), c.max_train_features, replace=False))]
        self.pca_ = LocalPCA(c.d, seed=c.seed).fit(train)
        reduced = [self.pca_.transform(s) for s in selected]
        train_reduced = np.concatenate(reduced)
        if len(train_reduced) > c.max_train_features:
            keep = np.sort(rng.choice(len(train_reduced), c.max_train_features, replace=False))
            train_reduced = train_reduced[keep]
        self.embedder_ = Embedder(
            c.embedding,
            c.k,
            seed=c.seed,
            n_iter=c.kmeans_iters,
            n_restarts=c.kmeans_restarts,
            # The democratic variant l2-normalises each whitened embedding (SPEC 4).
            normalize_after_whitening=c.aggregation == "democratic",
        ).fit(train_reduced)
        # Pass 2: aggregated vectors of the learning images for the rotation.
        if c.rotation != "none":
            if len(selected) <= c.embedding_dim:
                # The rotation learns at most N - 1 directions; the rest is an arbitrary completion
                # of the basis (SPEC 6). With fewer than 2 * drop learned directions the drop
                # keeps some of them (postprocessing.drop_start), and a learning image's
                # completion components, rounding noise, are zeroed; see postprocessing.
                warnings.warn(
                    f"{len(selected)} learning images for a {c.embedding_dim}-D rotation: only "
                    f"{len(selected) - 1} directions are learned, the rest completes the basis; "
                    "more learning images give a better-conditioned encoder",
                    SmallLearningSetWarning,
                    stacklevel=2,
                )
            psi = np.stack(
                [self._aggregate_reduced(r) for r in _tqdm(reduced, progress, "fit: rotation")]
            )
            self.rotation_ = Rotation(whiten=c.rotation == "whitening").fit(l2_normalize(psi))
        else:
            self.rotation_ = None
        self.n_train_images_ = len(selected)
        self.n_train_features_ = int(total)
        self.kept_fraction_ = float(np.mean(fractions))
        return self

    def _aggregate_reduced(self, reduced: np.ndarray) -> np.ndarray:
        c = self._cfg
        phi = self.embedder_.transform(reduced)
        if c.aggregation == "democratic":
            return aggregate("democratic", phi, gamma=c.democratic_gamma, n_iter=c.democratic_iters)
        return aggregate(c.aggregation, phi)

    # ------------------------------------------------------------------ encoding

    def aggregate(self, fmap: FeatureMap, device=None) -> np.ndarray:
        """The aggregated embedding (before post-processing) of one feature map, float32."""
        check_is_fitted(self, "pca_", "embedder_", "rotation_")
        local = self.select(fmap)
        device = encoding_device(device)
        if device is not None:  # PCA, embedding and aggregation as torch tensors there
            local = torch.from_numpy(local).to(device)
        psi = self._aggregate_reduced(self.pca_.transform(local))
        if isinstance(psi, torch.Tensor):
            psi = psi.float().cpu().numpy()
        return np.asarray(psi, dtype=np.float32)

    def postprocess(self, psi: np.ndarray) -> np.ndarray:
        """Final (D,) vector from an aggregated (D_emb,) embedding: l2, rotation, drop, power law, l2."""
        c = self._cfg
        return np.asarray(
            postprocess(psi, self.rotation_, c.effective_drop, c.alpha), dtype=np.float32
        )

    def _plan(self) -> EncodePlan:
        """The folded parameters (``selret.encoding.plan``), built on first use and rebuilt when
        the config or a learned object is replaced (held here, so ids cannot be reused)."""
        cached = getattr(self, "_plan_cache", None)
        c = self._cfg
        # the learned objects by identity, and the settings build_plan reads besides them
        key = (c.mask, c.embedding_dim, c.dim, c.effective_drop, c.aggregation, c.alpha,
               c.democratic_gamma, c.democratic_iters)  # fmt: skip
        if (
            cached is None
            or cached[0] != key
            or any(
                a is not getattr(self, n, None) for a, n in zip(cached[1], _LEARNED, strict=True)
            )
        ):
            check_is_fitted(self, *_LEARNED)
            learned = tuple(getattr(self, n) for n in _LEARNED)
            self._plan_cache = cached = (key, learned, build_plan(self))
        return cached[2]

    def encode(self, fmap: FeatureMap, device=None) -> np.ndarray:
        """The (D,) float32 unit-norm vector of one feature map (``encode_many`` of one map).
        With ``device`` (a torch device, 'cuda', or 'auto') the stages after the mask run there."""
        return self.encode_many([fmap], device=device)[0]

    def encode_many(
        self,
        maps: Iterable[FeatureMap],
        progress: bool = False,
        device=None,
        batch_size: int = 256,
        max_elements: int = 1 << 24,
        kept: list[float] | None = None,
        workers: int = 1,
    ) -> np.ndarray:
        """(N, D) float32 vectors of ``maps``, encoded in batches (``selret.encoding.batched``).

        A batch holds at most ``batch_size`` maps and about ``max_elements`` embedded values
        (kept features x embedding dimension: 64 MB of float32 by default). An image's vector
        agrees with ``encode`` of that map alone to float32 rounding, not bit for bit (BLAS rounds
        a row of a product differently with other rows beside it): cosine similarities agree to
        1e-5 (measured on the shipped encoders over paris6k-250: 1.1e-6 at most), so an indexed
        image finds itself first when queried alone. Components agree to about 1e-5 (1.6e-5 at
        most there); more only where the power law meets a component within rounding of 0,
        where its slope is infinite, or on an ill-conditioned encoder (a few learning images:
        float32 itself is then only good to about 1e-3). ``batch_size=1`` makes every vector
        bit-identical to ``encode`` of its map, whatever else is encoded (numpy path), for about
        15% of the CPU throughput. With ``device`` (a torch device, 'cuda', or 'auto': a GPU if there is one) every
        stage after the masks runs there. ``kept``, a list, gets each map's fraction of kept
        local features appended.

        The numpy path always runs BLAS on one thread (``selret.threads.single_threaded_blas``,
        whatever ``selret --threads`` says): the products of one image are too small for a
        multi-threaded BLAS to pay, and its threads spin at every barrier, at several times the
        single-threaded CPU cost. ``workers`` > 1: that many threads encode batches side by
        side instead, each with its one-thread BLAS.
        """
        plan = self._plan()
        device = encoding_device(device)
        rows_per_batch = max(1, max_elements // max(self._cfg.embedding_dim, 1))

        def batches() -> Iterator[list[np.ndarray]]:
            batch: list[np.ndarray] = []
            rows = 0
            for fmap in _tqdm(maps, progress, "encode"):
                local = select(plan, fmap)
                if kept is not None:
                    kept.append(local.shape[1] / (fmap.grid_shape[0] * fmap.grid_shape[1]))
                if batch and (len(batch) >= batch_size or rows + local.shape[1] > rows_per_batch):
                    yield batch
                    batch, rows = [], 0
                batch.append(local)
                rows += local.shape[1]
            if batch:
                yield batch

        if device is not None:
            out = [encode_local(plan, batch, device) for batch in batches()]
        elif workers > 1:
            out = _encode_in_threads(plan, batches(), workers)
        else:
            with single_threaded_blas():
                out = [encode_local(plan, batch, None) for batch in batches()]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # ------------------------------------------------------------------ persistence

    def get_state(self) -> dict[str, np.ndarray | int | float | str]:
        check_is_fitted(self, "pca_", "embedder_", "rotation_")
        state: dict = {}
        state |= {f"pca.{k}": v for k, v in self.pca_.get_state().items()}
        state |= {f"embedder.{k}": v for k, v in self.embedder_.get_state().items()}
        if self.rotation_ is not None:
            state |= {f"rotation.{k}": v for k, v in self.rotation_.get_state().items()}
        state["n_train_images"] = int(self.n_train_images_)
        state["n_train_features"] = int(self.n_train_features_)
        state["kept_fraction"] = float(self.kept_fraction_)
        return state

    @property
    def fingerprint(self) -> str:
        """sha1 of the config and every learned array: equal fingerprints encode identically."""
        # The preset label is a name, not a setting: two encoders learned alike are the same encoder.
        settings = {k: v for k, v in self._cfg.to_dict().items() if k != "preset"}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
        for key, value in sorted(self.get_state().items()):
            digest.update(key.encode())
            arr = np.asarray(value)
            digest.update(str(arr.dtype).encode() + str(arr.shape).encode())
            digest.update(np.ascontiguousarray(arr).tobytes())
        return digest.hexdigest()

    def save(
        self, path: str | Path, precision: str = "float32", provenance: dict | None = None
    ) -> Path:
        """Write config + learned arrays to one ``.npz`` (atomically; see
        :mod:`selret.encoding.persistence`). At float32 a reload encodes bit-identically;
        ``precision="float16"`` halves the file. ``provenance`` goes to the header as it is."""
        header = {"selret_version": __version__, "config": self._cfg.to_dict()}
        return write_encoder(path, header, self.get_state(), precision, provenance)

    @classmethod
    def load(cls, path: str | Path) -> Encoder:
        """The encoder saved at ``path``; raises EncoderFileError naming the file and the reason."""
        header, state = read_encoder(path)
        try:
            enc = cls(EncoderConfig.from_dict(header["config"]))
            enc.pca_ = LocalPCA.from_state(_sub(state, "pca."))
            enc.embedder_ = Embedder.from_state(_sub(state, "embedder."))
            rotation = _sub(state, "rotation.")
            enc.rotation_ = Rotation.from_state(rotation) if rotation else None
            enc.n_train_images_ = int(state["n_train_images"])
            enc.n_train_features_ = int(state["n_train_features"])
            enc.kept_fraction_ = float(state["kept_fraction"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EncoderFileError(path, f"inconsistent encoder file ({exc!r})") from None
        enc.provenance_ = header.get("provenance")
        return enc

    @classmethod
    def pretrained(cls, name: str) -> Encoder:
        """A pre-trained encoder shipped with selret (``selret encoders`` lists them)."""
        from selret.encoding.pretrained import load_pretrained

        return load_pretrained(name)

    def __repr__(self) -> str:
        c = self._cfg
        fitted = "fitted" if hasattr(self, "pca_") else "not fitted"
        return (
            f"Encoder({c.mask}-mask, {c.embedding} d={c.d} k={c.k}, {c.aggregation}, "
            f"{c.rotation}, D={c.dim}, {fitted})"
        )


def _encode_in_threads(plan: EncodePlan, batches: Iterable, workers: int) -> list[np.ndarray]:
    """``encode_local`` of each batch, ``workers`` at a time (BLAS releases the GIL), in order;
    at most ``2 * workers`` batches are selected ahead, so memory stays bounded."""
    from concurrent.futures import ThreadPoolExecutor

    out: list[np.ndarray] = []
    pending: collections.deque = collections.deque()
    with single_threaded_blas(), ThreadPoolExecutor(workers) as pool:
        for batch in batches:
            pending.append(pool.submit(encode_local, plan, batch, None))
            if len(pending) >= 2 * workers:
                out.append(pending.popleft().result())
        out.extend(future.result() for future in pending)
    return out


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _tqdm(iterable, progress: bool, desc: str):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="img")


__all__ = ["Encoder", "EncoderConfig", "ROTATIONS", "SmallLearningSetWarning", "encoding_device"]
