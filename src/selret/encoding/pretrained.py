"""Pre-trained encoders shipped with selret, so that someone with only photos needs no learning set.

Like cirtorch ships learned whitening with its networks, selret ships encoders (local PCA, codebook,
embedding whitening, rotation) learned on ``landmarks-learn``: 1,171 photos of buildings and
landmarks, none from Paris (the role Oxford5k plays for Paris in the paper). They are package data
under ``selret/encoding/pretrained_encoders/``; ``index.json`` names each file with its sha256, which
is checked at every load, and each file's header records its provenance (the exact fit command,
the learning-set manifest of file names and sha256, the selret version, D, the mask and the
fingerprint). ``benchmarks/pretrained.py`` refits them and compares with the shipped files.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from selret.encoding.persistence import EncoderFileError
from selret.errors import EncoderError
from selret.files import sha256_of

__all__ = [
    "PretrainedInfo",
    "UnknownEncoderError",
    "available",
    "default_name",
    "load_pretrained",
    "pretrained_path",
    "resolve_encoder",
]

_PACKAGE = "selret.encoding"
_FOLDER = "pretrained_encoders"


class UnknownEncoderError(EncoderError, ValueError):
    """Neither an encoder file nor the name of a shipped encoder."""

    hint = "`selret encoders` lists the pre-trained encoders; or pass an encoder file's path"


@dataclass(frozen=True)
class PretrainedInfo:
    """One shipped encoder as ``index.json`` lists it."""

    name: str
    file: str
    sha256: str
    dim: int
    mask: str
    description: str


def _folder() -> Path:
    return Path(str(resources.files(_PACKAGE) / _FOLDER))


@functools.cache
def _index() -> dict:
    path = _folder() / "index.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"default": None, "encoders": {}}


def available() -> list[PretrainedInfo]:
    """The shipped encoders, in the order ``index.json`` lists them."""
    return [
        PretrainedInfo(name=name, **entry) for name, entry in _index().get("encoders", {}).items()
    ]


def default_name() -> str | None:
    """The encoder commands use when given neither ``--encoder`` nor ``--learn``."""
    return _index().get("default")


def _info(name: str) -> PretrainedInfo:
    for info in available():
        if info.name == name:
            return info
    names = ", ".join(i.name for i in available()) or "none shipped"
    raise UnknownEncoderError(
        f"{name!r} is neither an encoder file nor a pre-trained encoder ({names})"
    )


def pretrained_path(name: str) -> Path:
    """The file of shipped encoder ``name``, after checking its sha256."""
    info = _info(name)
    path = _folder() / info.file
    if not path.is_file():
        raise EncoderFileError(path, f"pre-trained encoder {name!r} is missing from the package")
    digest = sha256_of(path)
    if digest != info.sha256:
        raise EncoderFileError(
            path, f"sha256 {digest} does not match the {info.sha256} recorded for {name!r}"
        )
    return path


def load_pretrained(name: str):
    """The shipped encoder ``name`` (sha256-checked), an :class:`~selret.encoding.encoder.Encoder`."""
    from selret.encoding.encoder import Encoder

    return Encoder.load(pretrained_path(name))


def resolve_encoder(name_or_path: str | Path):
    """An encoder from a file path, else from the name of a shipped encoder."""
    from selret.encoding.encoder import Encoder

    path = Path(name_or_path).expanduser()
    if path.exists() or path.suffix == ".npz" or "/" in str(name_or_path):
        return Encoder.load(path)
    return load_pretrained(str(name_or_path))
