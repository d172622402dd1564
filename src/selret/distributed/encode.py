"""The driver of the Ray pipeline: :func:`encode_collection` (see the package docstring)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from selret.distributed.shards import (
    DEFAULT_SHARD_ROWS,
    _check_fingerprint,
    _read_member,
    _shard_failures,
    list_shards,
    write_shard,
)
from selret.distributed.stages import EncodeActor, decode_batch
from selret.encoding.encoder import Encoder
from selret.files import list_images
from selret.search.engine import normalise_path

__all__ = ["EncodeSummary", "encode_collection"]


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
    encoder_config = json.dumps(encoder.config.to_dict())
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
                fn_kwargs={"encoder_config": encoder_config},
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
                    "encoder_config": encoder_config,
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
