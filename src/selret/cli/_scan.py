"""The images a command is given (a folder or a list file), with what the scan left out listed."""

from __future__ import annotations

from pathlib import Path


def images(source: Path) -> list[Path]:
    """The images of folder or list file ``source``; what the scan left out is listed (as by
    `selret extract`). NoImagesError (exit 3) when there is none, FileNotFoundError when
    ``source`` does not exist."""
    from selret.cli.extract import report_skipped
    from selret.errors import NoImagesError
    from selret.files import scan_images

    scan = scan_images(source)
    report_skipped(scan, None)
    if not scan.images:
        raise NoImagesError(source, "no images found")
    return scan.images
