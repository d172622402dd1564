"""The two compute stages of the Ray pipeline: :func:`decode_batch` (CPU tasks) and
:class:`EncodeActor` (an actor pool, CPU or GPU). Neither needs Ray itself, so both can be run
and tested as plain Python.

Images go from stage to stage as rows of numpy columns. An image that cannot be used gets its
``error`` / ``reason`` set and travels on, so that it ends up in its shard's failures file; only
the errors an image can cause are caught this way (see ``DECODE_ERRORS``): anything else is a bug,
which fails the Ray task (and, after Ray's retries, the job) instead of passing for a bad image.
"""

from __future__ import annotations

import json

import numpy as np

from selret.encoding.encoder import Encoder, EncoderConfig
from selret.errors import ConfigMismatchError, ImageError
from selret.features.extractor import Extractor
from selret.features.featuremap import FeatureMap
from selret.features.keypoints import detect_keypoints

__all__ = ["DECODE_ERRORS", "EncodeActor", "decode_batch"]

#: What a bad image file may raise while it is decoded and prepared (the errors
#: :class:`~selret.features.extractor.Extractor` files as a failed image).
DECODE_ERRORS = (ImageError, OSError, ValueError)

#: What a conv map the encoder cannot use raises (e.g. no local feature left to aggregate).
ENCODE_ERRORS = (ValueError,)

_DECODED_COLUMNS = (
    "path",
    "error",
    "reason",
    "rgb",
    "height",
    "width",
    "keypoints",
    "has_keypoints",
)


def _failure_reason(exc: BaseException) -> tuple[str, str]:
    """(error type, reason) of an image failure, as :class:`Extractor` logs them."""
    return type(exc).__name__, exc.reason if isinstance(exc, ImageError) else str(exc)


def decode_batch(batch: dict[str, np.ndarray], encoder_config: str) -> dict[str, np.ndarray]:
    """Ray stage 1 (CPU tasks): image paths -> network-input pixels, or the reason they failed.

    ``encoder_config`` is the encoder's config as JSON (:meth:`EncoderConfig.to_dict`): images
    are prepared by its :class:`Extractor` (``Extractor.prepare``), and get SIFT keypoints only
    when its mask is ``"sift"``. In: column ``path``. Out: ``path``, ``error`` / ``reason``
    (empty strings when decoding worked), ``rgb`` (the raw bytes of the H x W x 3 uint8 image),
    ``height``, ``width``, ``keypoints`` (raw float32 (N, 2) SIFT keypoints) and
    ``has_keypoints`` (False: keypoints were not computed, the map's ``keypoints`` is None).
    Images travel as raw bytes plus their shape because images of different sizes make a ragged
    column, which Ray's tensor columns handle differently across versions; a binary column
    always works. Raises whatever is not an image's fault (see :data:`DECODE_ERRORS`).
    """
    config = EncoderConfig.from_dict(json.loads(encoder_config))
    extractor = Extractor.for_config(config, keypoints=config.mask == "sift")
    out: dict[str, list] = {k: [] for k in _DECODED_COLUMNS}
    for path in batch["path"]:
        path = str(path)
        keypoints = None
        try:
            rgb = extractor.prepare(path).rgb
            if extractor.keypoints:
                keypoints = detect_keypoints(rgb)
            error = reason = ""
        except DECODE_ERRORS as exc:  # a bad image: its own failure, never the batch's
            error, reason = _failure_reason(exc)
            rgb, keypoints = np.zeros((0, 0, 3), np.uint8), None
        out["path"].append(path)
        out["error"].append(error)
        out["reason"].append(reason)
        out["rgb"].append(np.ascontiguousarray(rgb).tobytes())
        out["height"].append(rgb.shape[0])
        out["width"].append(rgb.shape[1])
        out["has_keypoints"].append(keypoints is not None)
        kps = np.zeros((0, 2), np.float32) if keypoints is None else keypoints
        out["keypoints"].append(np.ascontiguousarray(kps, np.float32).tobytes())
    columns = {k: np.array(v, dtype=object) for k, v in out.items()}
    columns["height"] = np.array(out["height"], np.int32)
    columns["width"] = np.array(out["width"], np.int32)
    columns["has_keypoints"] = np.array(out["has_keypoints"], bool)
    return columns


class EncodeActor:
    """Ray stage 2 (actor pool): decoded images -> global vectors.

    Each actor loads the encoder from ``encoder_path`` (which every worker node must be able to
    read at that path) and checks that the file is the very encoder the driver saw
    (``fingerprint``); it then holds one :class:`Extractor` of that encoder, whose backbone is
    loaded once, on ``device``. A call groups the batch's images by size (a forward pass needs
    equal sizes) and runs each group through :meth:`Extractor.forward` (``batch_size`` images per
    pass; a failed pass is split to find the image at fault), then one batched
    ``Encoder.encode_many`` over all the maps of the call (each map alone only if a map fails it).
    Out: ``path``, ``error``, ``reason``, ``vector`` ((n, D) float32; zeros where ``error`` is
    set), ``height``, ``width``.
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
        config = self.encoder.config
        self.extractor = Extractor.for_config(
            config, device=device, batch_size=batch_size, keypoints=config.mask == "sift"
        )
        _ = self.extractor.backbone  # loaded now, once per actor, not on the first batch
        # the encoding stages run where the backbone does (numpy on a CPU-only worker)
        self.device = None if device == "cpu" else device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        vectors = np.zeros((n, self.encoder.dim), np.float32)
        errors = [str(e) for e in batch["error"]]
        reasons = [str(r) for r in batch["reason"]]
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            if not errors[i]:
                groups.setdefault((int(batch["height"][i]), int(batch["width"][i])), []).append(i)
        maps: dict[int, FeatureMap] = {}  # the rows whose map the network gave
        for (h, w), rows in groups.items():
            rgbs = [np.frombuffer(batch["rgb"][i], np.uint8).reshape(h, w, 3) for i in rows]
            # forward() returns the RuntimeError of an image that fails in the network even
            # alone (torch's errors, OOM included) in place of its map; other errors propagate.
            for i, result in zip(rows, self.extractor.forward(rgbs), strict=True):
                if isinstance(result, Exception):
                    errors[i], reasons[i] = _failure_reason(result)
                    continue
                maps[i] = FeatureMap(result, (h, w), _keypoints(batch, i))
        self._encode(maps, vectors, errors, reasons)
        return {
            "path": batch["path"],
            "error": np.array(errors, dtype=object),
            "reason": np.array(reasons, dtype=object),
            "vector": vectors,
            "height": batch["height"],
            "width": batch["width"],
        }

    def _encode(self, maps: dict[int, FeatureMap], vectors, errors, reasons) -> None:
        """Vectors of ``maps`` (row -> map) in one batched ``encode_many``; if a map this encoder
        cannot use fails the batch, each map alone, so that only that one is reported."""
        if not maps:
            return
        try:
            vectors[list(maps)] = self.encoder.encode_many(list(maps.values()), device=self.device)
            return
        except ENCODE_ERRORS:
            pass
        for i, fmap in maps.items():
            try:
                vectors[i] = self.encoder.encode(fmap, device=self.device)
            except ENCODE_ERRORS as exc:  # a map this encoder cannot use
                errors[i], reasons[i] = _failure_reason(exc)


def _keypoints(batch: dict[str, np.ndarray], i: int) -> np.ndarray | None:
    """The SIFT keypoints of row ``i``, or None when :func:`decode_batch` did not compute them."""
    if not batch["has_keypoints"][i]:
        return None
    return np.frombuffer(batch["keypoints"][i], np.float32).reshape(-1, 2)
