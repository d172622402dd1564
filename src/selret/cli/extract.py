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
    log: Path | None = typer.Option(
        None, "--log", help="Append skipped, failed and damaged files to this JSONL file."
    ),
    accept_damaged: bool = typer.Option(
        False,
        "--accept-damaged",
        help="Use images whose data is damaged but decodable (corrupt JPEG data, trailing garbage, "
        "NaN pixels), with a warning, instead of refusing them.",
    ),
    draft: bool = typer.Option(
        False,
        "--draft",
        help="Decode JPEGs at 1/2, 1/4 or 1/8 scale when that still covers --max-side (faster, less "
        "memory; maps differ slightly and are cached apart from full decodes).",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Extract conv feature maps and SIFT keypoints of images into the feature cache.

    Already cached images are skipped, so an interrupted run resumes. Files a folder scan leaves
    out (other extensions, hidden files, broken links, FIFOs) and images that cannot be used are
    listed with the reason and do not stop the run. Exit code 0 when at least one image was
    extracted or found cached; 3 when none was (no image found, or every one failed) or the input
    does not exist; 6 for unusable weights; 1 when the cache cannot be written.
    """
    # Heavy imports here, so that `selret --help` stays fast.
    from selret.errors import NoImagesError
    from selret.features.cache import FeatureCache
    from selret.features.extractor import DEFAULT_NUM_WORKERS, Extractor
    from selret.files import scan_images

    scan = scan_images(input)
    report_skipped(scan, log)
    if not scan.images:
        raise NoImagesError(input, _nothing_found(scan))
    paths = scan.images
    extractor = Extractor(
        weights, layer, max_side, upscale=upscale,
        cache=FeatureCache(cache or default_cache_dir(), storage=storage.value),
        device=device.value, dtype=dtype.value, batch_size=batch_size,
        num_workers=DEFAULT_NUM_WORKERS if workers is None else workers,
        draft=draft, strict=not accept_damaged,
    )  # fmt: skip
    backbone = extractor.backbone
    size = f"max_side {max_side}" + ("" if upscale else ", no up-scaling")
    size += ", draft JPEG decoding" if draft else ""
    typer.echo(
        f"{len(paths)} images -> {extractor.cache.root} ({extractor.cache_id}, {size}, "
        f"{backbone.device}, {dtype.value})"
    )
    # A CacheError (the cache cannot be written) ends the run; finished entries are kept.
    report = extractor.extract(paths, progress=progress, log_path=log)

    typer.echo(report.summary())
    for path, reason in report.failed:
        typer.echo(f"  failed: {path}: {reason}")
    for path, reason in report.damaged:
        typer.echo(f"  damaged, used anyway: {path}: {reason}")
    if log is not None and (report.failed or report.damaged):
        typer.echo(f"failed and damaged images appended to {log}")
    example = _example_map(paths, report.failed, extractor)
    if example is not None:
        path, fmap = example
        k, h, w = fmap.features.shape
        typer.echo(
            f"example: {path.name}: map {k} x {h} x {w} from a {fmap.image_size[1]} x "
            f"{fmap.image_size[0]} px input, {len(fmap.keypoints)} SIFT keypoints"
        )
    if report.n_extracted + report.n_cached == 0:
        raise NoImagesError(input, f"none of the {len(paths)} images could be used")


#: Skipped files listed one by one on the terminal; beyond that, only counts (all are in --log).
MAX_LISTED = 50


def report_skipped(scan, log: Path | None = None, err: bool = True) -> None:
    """Print what the folder scan ``scan`` left out and why (on stderr by default: a command's
    stdout may carry JSON), and append it to the JSONL ``log``."""
    if not scan.skipped:
        return
    counts = ", ".join(f"{n} {kind}" for kind, n in scan.skipped_counts().items())
    typer.echo(f"skipped {len(scan.skipped)} files or folders ({counts}):", err=err)
    for item in scan.skipped[:MAX_LISTED]:
        typer.echo(f"  skipped: {item.path}: {item.reason}", err=err)
    more = len(scan.skipped) - MAX_LISTED
    if more > 0:
        where = f"listed in {log}" if log is not None else "--log FILE lists them all"
        typer.echo(f"  ... and {more} more ({where})", err=err)
    if log is not None:
        import json
        import time

        log.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with open(log, "a", encoding="utf-8") as fh:
            for item in scan.skipped:
                record = {"path": str(item.path), "status": "skipped", "kind": item.kind}
                fh.write(json.dumps({**record, "reason": item.reason, "time": stamp}) + "\n")


def _nothing_found(scan) -> str:
    if scan.skipped:
        return f"no images found ({len(scan.skipped)} files or folders skipped, listed above)"
    return "no images found"


def _example_map(paths, failed, extractor):
    """The first successfully cached (path, FeatureMap), for the summary."""
    bad = {p for p, _ in failed}
    for path in paths:
        if str(path) not in bad:
            fmap = extractor.cache.get(extractor.key(path))
            if fmap is not None:
                return path, fmap
    return None
