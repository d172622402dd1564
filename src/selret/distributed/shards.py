"""Shard files on disk: the output of :func:`~selret.distributed.encode_collection`.

A **shard** is a pair of files in the output folder:

* ``shard-<id>.npz``: ``vectors`` (n, D) float32, ``paths`` (n,) str, ``heights`` / ``widths``
  (n,) int32 of the network-input image, ``fingerprint`` and ``encoder_config`` (JSON) of the
  encoder, ``format`` / ``format_version``. Written last, atomically: it marks a finished shard.
* ``shard-<id>.failures.jsonl``: one ``{"path", "error", "reason"}`` line per image of that batch
  that could not be used (possibly empty). A bad image never stops the job.

``<id>`` is a hash of the paths the shard holds, so a Ray task that is retried rewrites the same
shard instead of adding a duplicate. Reading shards needs neither Ray nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selret.errors import ConfigMismatchError
from selret.files import atomic_write

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "SHARD_FORMAT_VERSION",
    "Shard",
    "iter_shards",
    "list_shards",
    "load_shard",
    "read_failures",
    "write_shard",
]

SHARD_FORMAT_VERSION = 1
"""Version of the shard file layout described in the module docstring."""

DEFAULT_SHARD_ROWS = 10_000
"""Images per shard when ``num_shards`` is not given (20 MB of 512-D vectors)."""

_SHARD_PREFIX = "shard-"
_FAILURES_SUFFIX = ".failures.jsonl"


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


def iter_shards(shard_dir: str | os.PathLike) -> Iterator[Shard]:
    """Every shard of ``shard_dir``, loaded one at a time."""
    for shard_file in list_shards(shard_dir):
        yield load_shard(shard_file)
