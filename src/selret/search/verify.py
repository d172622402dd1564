"""``selret index verify``: is an engine directory consistent with itself, its encoder and the
image files it indexes?

Checks that the vectors and the catalog hold the same images (the faiss count equals the catalog
rows, with the same ids), that the manifest names the encoder stored beside it (fingerprint, dim,
settings), and that every indexed file still exists with the sha256 recorded when it was encoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from selret.encoding.encoder import Encoder
from selret.errors import ImageError, IndexInconsistentError, NotAnIndexError
from selret.files import file_digest
from selret.search import storage
from selret.search.engine import ENCODER_FILE, INDEX_DIR
from selret.search.store import ImageIndex

__all__ = ["VerifyReport", "verify_engine"]


@dataclass
class VerifyReport:
    """What :func:`verify_engine` found. Every list holds ``(path, detail)`` pairs."""

    root: str
    images: int = 0  # catalog rows
    vectors: int = 0  # faiss count
    ok: int = 0
    stale: list[tuple[str, str]] = field(default_factory=list)  # content changed
    missing: list[tuple[str, str]] = field(default_factory=list)  # file gone or unreadable
    unrecorded: list[tuple[str, str]] = field(default_factory=list)  # no sha256 in the catalog
    problems: list[str] = field(default_factory=list)  # index-wide: counts, encoder
    leftovers: list[str] = field(default_factory=list)  # of interrupted saves; harmless

    @property
    def consistent(self) -> bool:
        return not (self.stale or self.missing or self.unrecorded or self.problems)

    def counts(self) -> str:
        return (
            f"{self.images} images, {self.vectors} vectors: {self.ok} ok, {len(self.stale)} "
            f"stale, {len(self.missing)} missing, {len(self.unrecorded)} without sha256"
        )

    def error(self) -> IndexInconsistentError:
        """The error a failed verification ends with (its hint says what to run)."""
        what = [f"{len(v)} {k}" for k, v in self._kinds() if v] + self.problems
        hint = (
            "rebuild it with this encoder: `selret index build IMAGES --index DIR --force`"
            if self.problems
            else "`selret index sync IMAGES --index DIR` re-encodes changed files, records "
            "missing sha256s and drops deleted files"
        )
        return IndexInconsistentError(
            f"{self.root}: index is inconsistent ({'; '.join(what)})", hint=hint
        )

    def _kinds(self):
        return (
            ("stale", self.stale),
            ("missing", self.missing),
            ("without sha256", self.unrecorded),
        )

    def as_dict(self) -> dict:
        return {
            "root": self.root, "consistent": self.consistent, "images": self.images,
            "vectors": self.vectors, "ok": self.ok, "stale": self.stale, "missing": self.missing,
            "unrecorded": self.unrecorded, "problems": self.problems, "leftovers": self.leftovers,
        }  # fmt: skip


def verify_engine(root: str | os.PathLike) -> VerifyReport:
    """Check the engine directory ``root`` (see the module docstring); reads every indexed file.

    Raises what opening raises when the encoder file or the index state is unreadable
    (:class:`~selret.errors.CorruptIndexError` also when the catalog and the vectors disagree);
    every other finding is in the report.
    """
    root = Path(root)
    if not (root / ENCODER_FILE).is_file() or not (root / INDEX_DIR).is_dir():
        raise NotAnIndexError(f"{root}: not a selret index (no {ENCODER_FILE} and {INDEX_DIR}/)")
    encoder = Encoder.load(root / ENCODER_FILE)
    index = ImageIndex.open(root / INDEX_DIR)  # checks catalog ids == vector ids
    report = VerifyReport(str(root), vectors=len(index))
    entries = index.entries()
    report.images = len(entries)
    if report.images != report.vectors:  # pragma: no cover - open refuses this already
        report.problems.append(f"{report.vectors} vectors but {report.images} catalog rows")
    if index.fingerprint != encoder.fingerprint:
        differing = storage.config_differences(index.encoder_config, encoder.config.to_dict())
        report.problems.append(
            f"index built by encoder {index.fingerprint}, {ENCODER_FILE} is {encoder.fingerprint}"
            f" (differing settings: {differing})"
        )
    if index.dim != encoder.dim:
        report.problems.append(f"index dim {index.dim}, encoder dim {encoder.dim}")
    for _, path, recorded in entries:
        if not os.path.exists(path):
            report.missing.append((path, "file not found"))
            continue
        try:
            digest = file_digest(path, fresh=True)  # the file as it is now, never a memo
        except ImageError as exc:
            report.missing.append((path, exc.reason))
            continue
        if recorded is None:
            report.unrecorded.append((path, "no sha256 recorded (indexed by an older selret)"))
        elif digest != recorded:
            report.stale.append((path, f"sha256 {recorded[:12]} when indexed, now {digest[:12]}"))
        else:
            report.ok += 1
    report.leftovers = [p.name for p in storage.leftovers(index.root, index.state)]
    return report
