"""``selret extract``: conv feature maps of a folder or list of images into the feature cache."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from selret.cli._app import app
from selret.files import default_cache_dir


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Storage(StrEnum):
    float32 = "float32"
    float16 = "float16"


@app.command()
def extract(
    input: Path = typer.Argument(
        ..., help="Folder of images (scanned recursively) or a text file with one path per line."
    ),
    cache: Path | None = typer.Option(
        None,
        "--cache",
        help="Feature cache folder [default: $SELRET_CACHE or ~/.cache/selret/features].",
    ),
    weights: str = typer.Option(
        "vgg16-caffe",
        help="'vgg16-caffe', 'random' (tests) or a path/URL of a torchvision VGG16 state dict.",
    ),
    layer: str = typer.Option(
        "pool5", help="pool5, conv5_3, conv5_2, conv5_1, conv4_3, conv4_2 or conv4_1."
    ),
    max_side: int = typer.Option(
        1024, "--max-side", help="Longest side of the network input, in pixels."
    ),
    upscale: bool = typer.Option(
        True,
        "--upscale/--no-upscale",
        help="Enlarge images smaller than --max-side (the paper's protocol), or keep their size.",
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Images of equal size per forward pass."
    ),
    device: Device = typer.Option(Device.auto, help="Where the network runs."),
    dtype: DType = typer.Option(DType.float32, help="Network precision (float16 needs CUDA)."),
    storage: Storage = typer.Option(Storage.float32, help="Precision of the stored maps."),
    workers: int | None = typer.Option(
        None, help="Decoding threads [default: min(4, CPUs)]; 0 decodes in the main thread."
    ),
    log: Path | None = typer.Option(None, "--log", help="Append failed images to this JSONL file."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Extract conv feature maps and SIFT keypoints of images into the feature cache.

    Already cached images are skipped, so an interrupted run resumes. Images that cannot be read
    are listed with the reason and do not stop the run; the exit code is non-zero only when no
    image could be processed.
    """
    # Heavy imports here, so that `selret --help` stays fast.
    from selret.errors import SelretError
    from selret.features.cache import FeatureCache
    from selret.features.extractor import DEFAULT_NUM_WORKERS, Extractor
    from selret.files import list_images

    try:
        paths = list_images(input)
    except (FileNotFoundError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not paths:
        typer.echo(f"error: {input}: no images found", err=True)
        raise typer.Exit(1)
    extractor = Extractor(
        weights, layer, max_side, upscale=upscale,
        cache=FeatureCache(cache or default_cache_dir(), storage=storage.value),
        device=device.value, dtype=dtype.value, batch_size=batch_size,
        num_workers=DEFAULT_NUM_WORKERS if workers is None else workers,
    )  # fmt: skip
    try:
        backbone = extractor.backbone
    except (SelretError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    size = f"max_side {max_side}" + ("" if upscale else ", no up-scaling")
    typer.echo(
        f"{len(paths)} images -> {extractor.cache.root} ({extractor.cache_id}, {size}, "
        f"{backbone.device}, {dtype.value})"
    )
    try:
        report = extractor.extract(paths, progress=progress, log_path=log)
    except SelretError as exc:  # the cache cannot be written; finished entries are kept
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None

    typer.echo(report.summary())
    for path, reason in report.failed:
        typer.echo(f"  failed: {path}: {reason}")
    if log is not None and report.failed:
        typer.echo(f"failures appended to {log}")
    example = _example_map(paths, report.failed, extractor)
    if example is not None:
        path, fmap = example
        k, h, w = fmap.features.shape
        typer.echo(
            f"example: {path.name}: map {k} x {h} x {w} from a {fmap.image_size[1]} x "
            f"{fmap.image_size[0]} px input, {len(fmap.keypoints)} SIFT keypoints"
        )
    if report.n_extracted + report.n_cached == 0:
        raise typer.Exit(1)


def _example_map(paths, failed, extractor):
    """The first successfully cached (path, FeatureMap), for the summary."""
    bad = {p for p, _ in failed}
    for path in paths:
        if str(path) not in bad:
            fmap = extractor.cache.get(extractor.key(path))
            if fmap is not None:
                return path, fmap
    return None
