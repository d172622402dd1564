"""Encoder files: one ``.npz`` holding a JSON header (config, scalars, provenance) and the learned
arrays, with no pickled code.

``precision="float16"`` stores the learned matrices (2-D arrays) in half precision, halving the file;
vectors stay as they are (means and eigenvalues span too wide a range for float16) and every array is
read back as float32 or wider, so encoding always runs at full precision. The header's optional
``provenance`` says where an encoder came from (the exact fit command, the learning-set manifest,
the fingerprint); shipped pre-trained encoders carry one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from selret.errors import EncoderError
from selret.files import atomic_write

__all__ = [
    "FORMAT_VERSION", "PRECISIONS", "EncoderFileError", "read_encoder", "read_header",
    "write_encoder",
]  # fmt: skip

#: 2: optional ``precision`` and ``provenance`` in the header.
FORMAT_VERSION = 2
PRECISIONS = ("float32", "float16")


class EncoderFileError(EncoderError, ValueError):
    """An encoder file that cannot be used: missing, corrupt, of another format or too new."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def write_encoder(
    path: str | Path,
    header: dict,
    state: dict,
    precision: str = "float32",
    provenance: dict | None = None,
) -> Path:
    """Write ``header`` (config etc.) and ``state`` (arrays and scalars) to ``path`` atomically."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    path = Path(path)
    arrays, scalars = {}, {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            half = precision == "float16" and value.ndim == 2 and value.dtype.kind == "f"
            arrays[key] = value.astype(np.float16) if half else value
        else:
            scalars[key] = value.item() if isinstance(value, np.generic) else value
    header = header | {
        "format": "selret-encoder",
        "format_version": FORMAT_VERSION,
        "precision": precision,
        "scalars": scalars,
    }
    if provenance is not None:
        header["provenance"] = provenance
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
    return path


def read_header(path: str | Path) -> dict:
    """The JSON header of an encoder file (config, scalars, provenance), without its arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["__header__"].tobytes().decode())
    except Exception as exc:  # as in read_encoder: any failure means an unusable file
        raise EncoderFileError(path, f"not a selret encoder file ({exc})") from None
    return header


def read_encoder(path: str | Path) -> tuple[dict, dict]:
    """(header, state) of an encoder file; half-precision arrays come back as float32.

    Raises EncoderFileError naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderFileError(path, "encoder file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        header = json.loads(arrays.pop("__header__").tobytes().decode())
    except Exception as exc:  # zip, npy and JSON errors all mean the same: not a usable file
        raise EncoderFileError(path, f"not a selret encoder file ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != "selret-encoder":
        raise EncoderFileError(path, "not a selret encoder file")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise EncoderFileError(
            path, f"encoder format {header['format_version']} is newer than this selret"
        )
    arrays = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}
    # A garbled file can still parse; NaN/inf parameters would make every vector NaN, silently.
    for key, value in arrays.items():
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise EncoderFileError(path, f"non-finite values in {key!r}")
    return header, arrays | header.get("scalars", {})
