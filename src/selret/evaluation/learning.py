"""Learning sets of evaluation runs: their images, a short name for reports, and the check that
they are held out (SPEC 8: every learned parameter comes from images disjoint from the evaluated set)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from selret.errors import ExitCode, SelretError
from selret.files import is_image_name, list_images

# Folder names too generic to name a learning set alone: their parent's name goes in front.
GENERIC_FOLDERS = ("jpg", "jpeg", "images", "reference", "references", "db")


class LearningSetOverlapError(SelretError, ValueError):
    """The learning set shares images with the evaluated ones (database or queries)."""

    exit_code = ExitCode.USAGE  # the learning set is an option the user gave

    def __init__(self, overlap: Sequence[Path], n_learn: int):
        self.overlap = [Path(p) for p in overlap]
        super().__init__(
            f"the learning set shares {len(self.overlap)} of its {n_learn} images with the evaluated "
            f"images, e.g. {[str(p) for p in self.overlap[:3]]}; every learned parameter must come "
            "from held-out images"
        )


def image_paths(sources: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``sources``: folders (recursive), list files, or image files."""
    out: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        out.extend([p] if p.is_file() and is_image_name(p) else list_images(p))
    return out


def source_name(sources: Sequence[str | Path]) -> str:
    """A short name for a learning set: its folders' names joined by ' + '.

    The generic folder names of the data sets here (``jpg``, ``Reference``) get their parent's
    name in front, so ``.../ukbench-56/jpg`` reads ``ukbench-56/jpg``.
    """
    names = []
    for src in sources:
        p = Path(src).expanduser().resolve()
        generic = p.name.lower() in GENERIC_FOLDERS
        names.append(f"{p.parent.name}/{p.name}" if generic else p.name)
    return " + ".join(names)


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    resolved = path.expanduser().resolve()
    try:
        st = resolved.stat()
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return str(resolved), inode


def check_disjoint(learn: Sequence[str | Path], evaluated: Sequence[str | Path]) -> None:
    """Raise :class:`LearningSetOverlapError` if a learning image is also an evaluated image.

    Two paths are the same image when they resolve to the same file (symlinks, ``..``) or are
    hard links of one file (same device and inode).
    """
    paths, inodes = set(), set()
    for p in evaluated:
        path, inode = _identity(Path(p))
        paths.add(path)
        if inode is not None:
            inodes.add(inode)
    overlap = []
    for p in learn:
        path, inode = _identity(Path(p))
        if path in paths or (inode is not None and inode in inodes):
            overlap.append(Path(p))
    if overlap:
        raise LearningSetOverlapError(overlap, len(learn))


__all__ = ["LearningSetOverlapError", "check_disjoint", "image_paths", "source_name"]
