"""Scale-out encoding with Ray Data: a collection of image files -> shards of global vectors.

The pipeline (see ``docs/SCALE_OUT.md``)::

    paths --from_items--> decode_batch (CPU tasks: prepare_image [+ SIFT keypoints])
          --> EncodeActor (actor pool, one Encoder + backbone per actor, CPU or GPU)
          --> write_shard (tasks: one shard-<id>.npz + shard-<id>.failures.jsonl per batch)

A **shard** is a pair of files in the output folder:

* ``shard-<id>.npz``: ``vectors`` (n, D) float32, ``paths`` (n,) str, ``heights`` / ``widths``
  (n,) int32 of the network-input image, ``fingerprint`` and ``encoder_config`` (JSON) of the
  encoder, ``format`` / ``format_version``. Written last, atomically: it marks a finished shard.
* ``shard-<id>.failures.jsonl``: one ``{"path", "error", "reason"}`` line per image of that batch
  that could not be used (possibly empty). A bad image never stops the job.

``<id>`` is a hash of the paths the shard holds, so a Ray task that is retried rewrites the same
shard instead of adding a duplicate. A rerun on the same output folder encodes only the paths no
shard holds yet (failed ones are retried). Shards are then added to an :class:`ImageIndex` or a
:class:`~selret.search.engine.SearchEngine` (:func:`ingest_shards`), or each turned into its own index
for :class:`~selret.search.index.ShardedSearch` (:func:`shard_indexes`).

Ray and torch are imported inside the functions that need them: reading shards needs neither.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selret.encoding.encoder import Encoder
from selret.errors import ConfigMismatchError, ImageError
from selret.features import FeatureMap
from selret.files import atomic_write, list_images
from selret.search.engine import ENCODER_FILE, INDEX_DIR, SearchEngine, normalise_path
from selret.search.index import ImageIndex

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "SHARD_FORMAT_VERSION",
    "EncodeActor",
    "EncodeSummary",
    "IngestReport",
    "Shard",
    "decode_batch",
    "encode_collection",
    "ingest_shards",
    "iter_shards",
    "list_shards",
    "load_shard",
    "read_failures",
    "shard_indexes",
    "write_shard",
]

SHARD_FORMAT_VERSION = 1
"""Version of the shard file layout described in the module docstring."""

DEFAULT_SHARD_ROWS = 10_000
"""Images per shard when ``num_shards`` is not given (20 MB of 512-D vectors)."""

_SHARD_PREFIX = "shard-"
_FAILURES_SUFFIX = ".failures.jsonl"


# ===================================================================== shards on disk


@dataclass
class Shard:
    """The contents of one ``shard-<id>.npz`` file."""

    path: Path
    vectors: np.ndarray  # (n, D) float32
    paths: list[str]
    heights: np.ndarray  # (n,) int32, network-input image height
    widths: np.ndarray  # (n,) int32
    fingerprint: str
    encoder_config: dict

    @property
    def name(self) -> str:
        return self.path.stem

    def metadata(self) -> list[dict]:
        """Per-image metadata as :meth:`SearchEngine.add_images` stores it."""
        return [
            {"height": int(h), "width": int(w)}
            for h, w in zip(self.heights, self.widths, strict=True)
        ]


def list_shards(shard_dir: str | os.PathLike) -> list[Path]:
    """The finished shard files (``shard-*.npz``) of ``shard_dir``, sorted by name."""
    return sorted(Path(shard_dir).glob(f"{_SHARD_PREFIX}*.npz"))


def _read_member(path: Path, name: str) -> np.ndarray:
    # np.load of an .npz reads members lazily: resuming reads only the paths of each shard.
    with np.load(path, allow_pickle=False) as data:
        return data[name]


def load_shard(path: str | os.PathLike) -> Shard:
    """Read one shard file (ValueError if it is not one)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        if str(data["format"]) != "selret-shard":
            raise ValueError(f"{path}: not a selret shard")
        if int(data["format_version"]) > SHARD_FORMAT_VERSION:
            raise ValueError(
                f"{path}: shard format {int(data['format_version'])} is newer than this selret"
            )
        return Shard(
            path=path,
            vectors=data["vectors"],
            paths=[str(p) for p in data["paths"]],
            heights=data["heights"],
            widths=data["widths"],
            fingerprint=str(data["fingerprint"]),
            encoder_config=json.loads(str(data["encoder_config"])),
        )


def _failures_path(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.stem + _FAILURES_SUFFIX)


def read_failures(shard_dir: str | os.PathLike) -> list[dict]:
    """``{"path", "error", "reason"}`` of every image that failed and is in no shard.

    A path that failed in one run and was encoded by a later (resumed) run is not listed; a path
    that failed several times is listed once, with its latest failure.
    """
    shard_files = list_shards(shard_dir)
    encoded = {p for f in shard_files for p in _read_member(f, "paths").tolist()}
    failures: dict[str, dict] = {}
    # Oldest first, so the most recent failure of a path wins.
    for shard in sorted(shard_files, key=lambda f: f.stat().st_mtime):
        for record in _shard_failures(shard):
            if record["path"] not in encoded:
                failures[record["path"]] = record
    return list(failures.values())


def _shard_failures(shard_path: Path) -> list[dict]:
    """The failure records written with one shard (none if its failures file is missing)."""
    log = _failures_path(shard_path)
    if not log.is_file():
        return []
    lines = log.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _check_fingerprint(shard_file: Path, fingerprint: str, against: str) -> None:
    found = str(_read_member(shard_file, "fingerprint"))
    if found != fingerprint:
        raise ConfigMismatchError(
            f"{shard_file}: made by encoder {found!r}, but {against} is encoder {fingerprint!r}; "
            "vectors of different encoders cannot be mixed"
        )


# ===================================================================== the Ray stages


def _failure_reason(exc: BaseException) -> tuple[str, str]:
    """(error type, reason) of an image failure, as ``selret.features.extract`` logs them."""
    return type(exc).__name__, exc.reason if isinstance(exc, ImageError) else str(exc)


def decode_batch(batch: dict[str, np.ndarray], max_side: int, sift: bool) -> dict[str, np.ndarray]:
    """Ray stage 1 (CPU tasks): image paths -> network-input pixels, or the reason they failed.

    In: column ``path``. Out: ``path``, ``error`` / ``reason`` (empty strings when decoding
    worked), ``rgb`` (the raw bytes of the H x W x 3 uint8 image), ``height``, ``width`` and
    ``keypoints`` (raw float32 (N, 2) SIFT keypoints; none unless ``sift``). Images travel as raw
    bytes plus their shape because images of different sizes make a ragged column, which Ray's
    tensor columns handle differently across versions; a binary column always works.
    """
    from selret.features.io import prepare_image
    from selret.features.keypoints import detect_keypoints

    out: dict[str, list] = {
        k: [] for k in ("path", "error", "reason", "rgb", "height", "width", "keypoints")
    }
    for path in batch["path"]:
        path = str(path)
        try:
            rgb = prepare_image(path, max_side=max_side).rgb
            keypoints = detect_keypoints(rgb) if sift else np.zeros((0, 2), np.float32)
            error = reason = ""
        except Exception as exc:  # any failure belongs to this image alone
            error, reason = _failure_reason(exc)
            rgb, keypoints = np.zeros((0, 0, 3), np.uint8), np.zeros((0, 2), np.float32)
        out["path"].append(path)
        out["error"].append(error)
        out["reason"].append(reason)
        out["rgb"].append(np.ascontiguousarray(rgb).tobytes())
        out["height"].append(rgb.shape[0])
        out["width"].append(rgb.shape[1])
        out["keypoints"].append(np.ascontiguousarray(keypoints, np.float32).tobytes())
    return {
        "path": np.array(out["path"], dtype=object),
        "error": np.array(out["error"], dtype=object),
        "reason": np.array(out["reason"], dtype=object),
        "rgb": np.array(out["rgb"], dtype=object),
        "height": np.array(out["height"], np.int32),
        "width": np.array(out["width"], np.int32),
        "keypoints": np.array(out["keypoints"], dtype=object),
    }


class EncodeActor:
    """Ray stage 2 (actor pool): decoded images -> global vectors.

    Each actor loads the encoder from ``encoder_path`` (which every worker node must be able to
    read at that path) and its backbone once, on ``device``, and checks that the file is the very
    encoder the driver saw (``fingerprint``). A call groups the batch's images by size and runs
    each group through the backbone ``batch_size`` images at a time (``forward_maps`` needs equal
    sizes), then ``Encoder.encode`` per map. Out: ``path``, ``error``, ``reason``, ``vector``
    ((n, D) float32; zeros where ``error`` is set), ``height``, ``width``.
    """

    def __init__(
        self,
        encoder_path: str,
        fingerprint: str,
        batch_size: int = 8,
        device: str = "cpu",
        num_threads: int | None = None,
    ):
        import torch

        if num_threads and device == "cpu":
            # torch would start one thread per core of the node, fighting the decode tasks and
            # the other actors for the cores Ray gave them.
            torch.set_num_threads(num_threads)
        self.encoder = Encoder.load(encoder_path)
        if self.encoder.fingerprint != fingerprint:
            raise ConfigMismatchError(
                f"{encoder_path}: on this worker it is encoder {self.encoder.fingerprint!r}, on the "
                f"driver {fingerprint!r}; every node must see the same file"
            )
        self.backbone = self.encoder.backbone(device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        vectors = np.zeros((n, self.encoder.dim), np.float32)
        errors = [str(e) for e in batch["error"]]
        reasons = [str(r) for r in batch["reason"]]
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            if not errors[i]:
                groups.setdefault((int(batch["height"][i]), int(batch["width"][i])), []).append(i)
        for (h, w), rows in groups.items():
            for lo in range(0, len(rows), self.batch_size):
                self._encode_rows(
                    batch, rows[lo : lo + self.batch_size], h, w, vectors, errors, reasons
                )
        return {
            "path": batch["path"],
            "error": np.array(errors, dtype=object),
            "reason": np.array(reasons, dtype=object),
            "vector": vectors,
            "height": batch["height"],
            "width": batch["width"],
        }

    def _encode_rows(self, batch, rows, h, w, vectors, errors, reasons) -> None:
        """Vectors of ``rows`` (images of size h x w) into ``vectors``; failures into errors."""
        rgb = np.stack([np.frombuffer(batch["rgb"][i], np.uint8).reshape(h, w, 3) for i in rows])
        try:
            maps = self.backbone.forward_maps(rgb)
        except Exception as exc:
            if len(rows) > 1:  # find the image at fault, or get through singly (e.g. GPU OOM)
                for i in rows:
                    self._encode_rows(batch, [i], h, w, vectors, errors, reasons)
                return
            errors[rows[0]], reasons[rows[0]] = _failure_reason(exc)
            return
        for i, features in zip(rows, maps, strict=True):
            keypoints = np.frombuffer(batch["keypoints"][i], np.float32).reshape(-1, 2)
            try:
                vectors[i] = self.encoder.encode(FeatureMap(features, (h, w), keypoints))
            except Exception as exc:
                errors[i], reasons[i] = _failure_reason(exc)


def write_shard(
    batch: dict[str, np.ndarray], out_dir: str, fingerprint: str, encoder_config: str
) -> dict[str, np.ndarray]:
    """Ray stage 3 (tasks): one batch of encoded rows -> one shard (npz + failures JSONL).

    Returns one summary row: ``shard`` (file name), ``n_vectors``, ``n_failed``.
    """
    out = Path(out_dir)
    paths = [str(p) for p in batch["path"]]
    ok = np.array([not e for e in batch["error"]], bool)
    digest = hashlib.sha1("\n".join(sorted(paths)).encode()).hexdigest()[:16]
    shard = out / f"{_SHARD_PREFIX}{digest}.npz"
    failures = "".join(
        json.dumps({"path": p, "error": str(e), "reason": str(r)}) + "\n"
        for p, e, r, good in zip(paths, batch["error"], batch["reason"], ok, strict=True)
        if not good
    )
    # The failures first, the npz last: a finished npz implies its failures file is complete.
    atomic_write(_failures_path(shard), lambda fh: fh.write(failures.encode()))
    atomic_write(
        shard,
        lambda fh: np.savez(
            fh,
            vectors=np.asarray(batch["vector"], np.float32)[ok],
            paths=np.array([p for p, good in zip(paths, ok, strict=True) if good], dtype=str),
            heights=np.asarray(batch["height"], np.int32)[ok],
            widths=np.asarray(batch["width"], np.int32)[ok],
            fingerprint=np.array(fingerprint),
            encoder_config=np.array(encoder_config),
            format=np.array("selret-shard"),
            format_version=np.array(SHARD_FORMAT_VERSION),
        ),
    )
    return {
        "shard": np.array([shard.name], dtype=object),
        "n_vectors": np.array([int(ok.sum())]),
        "n_failed": np.array([int((~ok).sum())]),
    }


# ===================================================================== the driver


@dataclass
class EncodeSummary:
    """Outcome of :func:`encode_collection`.

    ``n_skipped`` counts paths some shard of ``out_dir`` already held (a resumed run);
    ``failed`` lists ``(path, "ErrorType: reason")`` of this run's failures; ``shards`` the
    shard files this run wrote; ``seconds`` the wall-clock time of the Ray pipeline.
    """

    out_dir: Path
    n_total: int = 0
    n_skipped: int = 0
    n_encoded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failed)

    @property
    def images_per_second(self) -> float:
        return self.n_encoded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.n_total} images: {self.n_encoded} encoded, {self.n_skipped} already in shards, "
            f"{self.n_failed} failed, in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s); "
            f"{len(self.shards)} shards written to {self.out_dir}"
        )


def _image_paths(images: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Normalised, de-duplicated image paths of a folder, a list file or an iterable of paths."""
    if isinstance(images, str | os.PathLike):
        images = list_images(images)
    return list(dict.fromkeys(normalise_path(p) for p in images))


def _actor_pool(
    num_gpus: float | None, concurrency: int | tuple[int, int] | None, cpus_per_worker: float
) -> tuple[float, int | tuple[int, int]]:
    """(GPUs per actor, actor-pool size) from the arguments and the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if concurrency is None:
        if num_gpus > 0:
            # One actor per GPU share; 1 while no GPU node is up yet (an autoscaler starts one).
            concurrency = max(1, int(gpus // num_gpus))
        else:
            # Leave a CPU to the decode and write tasks, or actors would starve them.
            concurrency = max(1, int((cpus - 1) // cpus_per_worker))
    return num_gpus, concurrency


def _actor_strategy(pool: int | tuple[int, int]):
    """Ray Data's actor-pool strategy: a fixed size, or ``(min, max)`` to autoscale between."""
    from ray.data import ActorPoolStrategy

    if isinstance(pool, int):
        return ActorPoolStrategy(size=pool)
    low, high = pool
    return ActorPoolStrategy(min_size=low, max_size=high)


def encode_collection(
    images: str | os.PathLike | Iterable[str | os.PathLike],
    encoder_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_shards: int | None = None,
    batch_size: int = 8,
    num_gpus_per_worker: float | None = None,
    concurrency: int | tuple[int, int] | None = None,
    ray_address: str | None = None,
    cpus_per_worker: float = 1.0,
    progress: bool = True,
) -> EncodeSummary:
    """Encode a collection of image files on a Ray cluster into vector shards under ``out_dir``.

    ``images``: a folder (scanned recursively), a list file (one path per line) or an iterable of
    paths; paths are keyed absolute and resolved, as :class:`SearchEngine` keys them, and must be
    readable at that path by every worker, as must ``encoder_path``. Paths some shard of
    ``out_dir`` holds already are skipped, so an interrupted run is resumed by rerunning it;
    existing shards of another encoder raise ConfigMismatchError.

    ``num_shards``: about how many shards to cut this run's images into (each holds at most
    ``ceil(n / num_shards)`` images; default: :data:`DEFAULT_SHARD_ROWS` per shard).
    ``batch_size``: images per backbone forward pass (of equal size; see :class:`EncodeActor`).
    ``num_gpus_per_worker``: GPUs per encoding actor (fractions share a GPU); None: 1 if the
    cluster has GPUs, else 0 (CPU). ``concurrency``: actor-pool size, or ``(min, max)`` to let
    Ray Data scale the pool; None: one actor per GPU share, or per ``cpus_per_worker`` CPUs
    minus one CPU kept for decoding. ``ray_address``: cluster to connect to (``"auto"``,
    ``"ray://host:10001"``); None: ``$RAY_ADDRESS``, else a new local Ray instance. A process
    already connected to Ray keeps its connection (``ray_address`` is then ignored); a Ray
    instance this call started or connected to is shut down at the end.
    """
    import ray

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    out = Path(out_dir).expanduser().resolve()
    encoder_path = normalise_path(encoder_path)
    encoder = Encoder.load(encoder_path)
    fingerprint = encoder.fingerprint
    paths = _image_paths(images)
    out.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    for shard_file in list_shards(out):
        _check_fingerprint(shard_file, fingerprint, encoder_path)
        done.update(_read_member(shard_file, "paths").tolist())
    todo = [p for p in paths if p not in done]
    summary = EncodeSummary(out_dir=out, n_total=len(paths), n_skipped=len(paths) - len(todo))
    if not todo:
        return summary

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=ray_address)
    context = ray.data.DataContext.get_current()
    progress_before = context.enable_progress_bars
    context.enable_progress_bars = progress
    try:
        num_gpus, pool = _actor_pool(num_gpus_per_worker, concurrency, cpus_per_worker)
        shard_rows = math.ceil(len(todo) / num_shards) if num_shards else DEFAULT_SHARD_ROWS
        start = time.perf_counter()
        rows = (
            ray.data.from_items([{"path": p} for p in todo])
            .map_batches(
                decode_batch,
                batch_size=batch_size,
                fn_kwargs={
                    "max_side": encoder.config.max_side,
                    "sift": encoder.config.mask == "sift",
                },
            )
            .map_batches(
                EncodeActor,
                batch_size=batch_size,
                fn_constructor_kwargs={
                    "encoder_path": encoder_path,
                    "fingerprint": fingerprint,
                    "batch_size": batch_size,
                    "device": "cuda" if num_gpus > 0 else "cpu",
                    "num_threads": max(1, int(cpus_per_worker)),
                },
                compute=_actor_strategy(pool),
                num_gpus=num_gpus,
                num_cpus=cpus_per_worker,
            )
            .map_batches(
                write_shard,
                batch_size=shard_rows,
                fn_kwargs={
                    "out_dir": str(out),
                    "fingerprint": fingerprint,
                    "encoder_config": json.dumps(encoder.config.to_dict()),
                },
            )
            .take_all()
        )
        summary.seconds = time.perf_counter() - start
    finally:
        context.enable_progress_bars = progress_before
        if started_ray:
            ray.shutdown()
    summary.shards = sorted({out / row["shard"] for row in rows})
    summary.n_encoded = sum(int(row["n_vectors"]) for row in rows)
    summary.failed = [
        (record["path"], f"{record['error']}: {record['reason']}")
        for shard_file in summary.shards
        for record in _shard_failures(shard_file)
    ]
    return summary


# ===================================================================== ingestion


@dataclass
class IngestReport:
    """Outcome of :func:`ingest_shards`: ``added`` new images, ``skipped`` ones already indexed,
    ``failures`` of the encoding run (see :func:`read_failures`)."""

    index_path: Path
    shards: int = 0
    added: int = 0
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)


def _open_target(
    target: str | os.PathLike | ImageIndex | SearchEngine,
    first_shard: Shard,
    encoder_path: str | os.PathLike | None,
    kind: str,
) -> ImageIndex:
    """The ImageIndex to ingest into: given, of an engine, opened, or created when absent."""
    if isinstance(target, SearchEngine):
        return target.index
    if isinstance(target, ImageIndex):
        return target
    root = Path(target)
    if (root / ENCODER_FILE).is_file() and (root / INDEX_DIR).is_dir():
        return SearchEngine.open(root).index
    if root.is_dir() and any(root.iterdir()):
        return ImageIndex.open(root)
    if encoder_path is not None:  # a new engine, servable by `selret serve` / `selret search`
        return SearchEngine.create(root, Encoder.load(encoder_path), kind=kind).index
    return ImageIndex.create(
        root,
        first_shard.vectors.shape[1],
        first_shard.encoder_config,
        first_shard.fingerprint,
        kind=kind,
    )


def ingest_shards(
    shard_dir: str | os.PathLike,
    target: str | os.PathLike | ImageIndex | SearchEngine,
    encoder_path: str | os.PathLike | None = None,
    kind: str = "exact",
) -> IngestReport:
    """Add every shard of ``shard_dir`` to one index, and save it.

    ``target``: an :class:`ImageIndex` or :class:`SearchEngine`, or a directory holding either
    (an engine directory has ``encoder.npz`` and ``index/``). A missing or empty directory
    becomes a new engine with the encoder at ``encoder_path`` when given, else a bare
    ImageIndex of kind ``kind``. Every shard must come from the index's encoder (checked before
    anything is added: ConfigMismatchError). Images already indexed are skipped, so ingesting
    again after a resumed encoding run adds only the new shards' images.
    """
    shard_files = list_shards(shard_dir)
    if not shard_files:
        raise FileNotFoundError(f"{shard_dir}: no {_SHARD_PREFIX}*.npz shards")
    index = _open_target(target, load_shard(shard_files[0]), encoder_path, kind)
    for shard_file in shard_files:
        _check_fingerprint(shard_file, index.fingerprint, f"the index {index.root}")
    report = IngestReport(index_path=index.root, shards=len(shard_files))
    for shard_file in shard_files:
        shard = load_shard(shard_file)
        added = index.add(shard.paths, shard.vectors, shard.metadata())
        report.added += len(added)
        report.skipped += len(shard.paths) - len(added)
    index.save()
    report.failures = read_failures(shard_dir)
    return report


def shard_indexes(
    shard_dir: str | os.PathLike, index_root: str | os.PathLike, kind: str = "exact"
) -> list[ImageIndex]:
    """One :class:`ImageIndex` per non-empty shard, at ``index_root/<shard name>``.

    Existing shard indexes are reopened (and completed if a shard grew), so this is cheap to
    call again. Search them together with ``ShardedSearch(shard_indexes(...))``: with exact
    indexes it returns the same top-k as one index holding every vector.
    """
    root = Path(index_root)
    indexes = []
    for shard_file in list_shards(shard_dir):
        shard = load_shard(shard_file)
        if not shard.paths:
            continue
        where = root / shard.name
        if where.exists():
            index = ImageIndex.open(where, expected_fingerprint=shard.fingerprint)
        else:
            index = ImageIndex.create(
                where, shard.vectors.shape[1], shard.encoder_config, shard.fingerprint, kind=kind
            )
        if index.add(shard.paths, shard.vectors, shard.metadata()):
            index.save()
        indexes.append(index)
    return indexes


def iter_shards(shard_dir: str | os.PathLike) -> Iterator[Shard]:
    """Every shard of ``shard_dir``, loaded one at a time."""
    for shard_file in list_shards(shard_dir):
        yield load_shard(shard_file)
