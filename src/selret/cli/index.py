"""``selret index build|add|remove|info`` and ``selret search``: a persistent searchable index."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from selret.cli._app import app
from selret.cli.encoder import ENCODER_HELP, load_encoder

index_app = typer.Typer(
    help="Create and maintain a persistent image index (encoder + faiss vectors + SQLite catalog).",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")

ENGINE_HELP = "Index directory (holds encoder.npz and index/)."


def _images(source: Path) -> list[Path]:
    from selret.files import list_images

    paths = list_images(source)
    if not paths:
        raise typer.BadParameter(f"{source}: no images found")
    return paths


def _print_add_report(report) -> None:
    typer.echo(
        f"added {report.added}, already indexed {report.skipped}, failed {len(report.failed)}"
    )
    for path, reason in report.failed:
        typer.echo(f"  failed {path}: {reason}", err=True)


@index_app.command("build")
def build(
    args: list[Path] = typer.Argument(
        ...,
        help="IMAGES (a folder or a list file) with --index DIR, or the older ENGINE_DIR IMAGES.",
    ),
    index_dir: Path | None = typer.Option(None, "--index", "-i", help=ENGINE_HELP),
    encoder_name: str | None = typer.Option(None, "--encoder", "-e", help=ENCODER_HELP),
    learn: Path | None = typer.Option(
        None, help="Fit a new encoder on these held-out images instead of --encoder."
    ),
    preset: str | None = typer.Option(None, help="Preset for --learn [temb-demo-512]."),
    mask: str | None = typer.Option(None, help="Mask for --learn [max]."),
    max_side: int | None = typer.Option(None, "--max-side", help="Image size for --learn [1024]."),
    weights: str | None = typer.Option(None, help="Backbone weights for --learn [vgg16-caffe]."),
    kind: str = typer.Option("exact", help="exact, hnsw, ivfpq or auto (by collection size)."),
    cache: Path | None = typer.Option(
        None, help="Feature cache [$SELRET_CACHE or ~/.cache/selret/features]."
    ),
) -> None:
    """Create an index of IMAGES with an encoder (default: the default pre-trained one, or one fitted
    on --learn)."""
    from selret.encoding.encoder import Encoder
    from selret.search.engine import SearchEngine

    engine_dir, images = _build_targets(args, index_dir)
    if encoder_name is not None and learn is not None:
        raise typer.BadParameter("give at most one of --encoder and --learn")
    if learn is None:
        encoder = load_encoder(encoder_name)
    else:
        from selret.cli.encoder import config_from_options
        from selret.features.extractor import Extractor

        config = config_from_options(preset, dict(mask=mask, max_side=max_side, weights=weights))
        maps = Extractor.for_config(config, cache=cache).maps(_images(learn))
        encoder = Encoder(config).fit(maps, progress=True)
    engine = SearchEngine.create(engine_dir, encoder, kind=kind, cache_dir=cache)
    _print_add_report(engine.add_images(_images(images)))
    typer.echo(f"{engine_dir}: {len(engine.index)} images, {encoder!r}")


def _build_targets(args: list[Path], index_dir: Path | None) -> tuple[Path, Path]:
    if index_dir is not None and len(args) == 1:
        return index_dir, args[0]
    if index_dir is None and len(args) == 2:
        return args[0], args[1]
    raise typer.BadParameter("give IMAGES --index DIR (or ENGINE_DIR IMAGES)")


@index_app.command("add")
def add(
    engine_dir: Path = typer.Argument(..., help=ENGINE_HELP),
    images: Path = typer.Argument(
        ..., help="Images to add: a folder or a list file. Indexed ones are skipped."
    ),
    cache: Path | None = typer.Option(None, help="Feature cache."),
) -> None:
    """Add images to an index (incremental: already-indexed images are skipped)."""
    from selret.search.engine import SearchEngine

    engine = SearchEngine.open(engine_dir, cache_dir=cache)
    _print_add_report(engine.add_images(_images(images)))
    typer.echo(f"{engine_dir}: {len(engine.index)} images")


@index_app.command("remove")
def remove(
    engine_dir: Path = typer.Argument(..., help=ENGINE_HELP),
    paths: list[str] = typer.Argument(..., help="Image paths (or catalog ids) to remove."),
) -> None:
    """Remove images from an index."""
    from selret.search.engine import SearchEngine

    engine = SearchEngine.open(engine_dir)
    items = [int(p) if p.isdigit() else p for p in paths]
    typer.echo(f"removed {engine.remove_images(items)}; {len(engine.index)} images left")


@index_app.command("info")
def info(
    engine_dir: Path = typer.Argument(..., help=ENGINE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Describe an index: size, dimension, index kind, encoder."""
    from selret.search.engine import SearchEngine

    data = SearchEngine.open(engine_dir).info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key in (
        "engine_path",
        "count",
        "dim",
        "kind",
        "index_kind",
        "encoder",
        "encoder_fingerprint",
        "disk_bytes",
    ):
        typer.echo(f"{key:20s} {data[key]}")


def parse_bbox(text: str | None) -> list[float] | None:
    """--bbox 'x1,y1,x2,y2' -> four floats, or a usage error."""
    from selret.errors import BoundingBoxError
    from selret.features.io import parse_bbox as parse

    try:
        return parse(text)
    except BoundingBoxError as exc:
        raise typer.BadParameter(exc.reason, param_hint="--bbox") from None


@app.command()
def search(
    image: Path = typer.Argument(..., help="Query image."),
    engine_dir: Path | None = typer.Option(None, "--index", "-i", help=ENGINE_HELP),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Search this folder (or list file) instead of an index: it is indexed on the fly "
        "(maps cached) with --encoder or the default pre-trained encoder.",
    ),
    encoder_name: str | None = typer.Option(None, "--encoder", "-e", help=ENCODER_HELP),
    cache: Path | None = typer.Option(
        None, help="Feature cache [$SELRET_CACHE or ~/.cache/selret/features]."
    ),
    top: int = typer.Option(10, "--top", "-k", min=1, help="Number of results."),
    bbox: str | None = typer.Option(
        None, help="Query region x1,y1,x2,y2 in original-image pixels."
    ),
    qe: int = typer.Option(
        0, "--qe", min=0, help="Average query expansion with the top N results (0 = off)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Search an index (or a folder, with --images) with a query image; prints the ranked results."""
    from selret.errors import SelretError
    from selret.search.engine import SearchEngine

    if (engine_dir is None) == (images is None):
        raise typer.BadParameter("give --index DIR or --images FOLDER")
    if engine_dir is not None:
        if encoder_name is not None:
            raise typer.BadParameter("an index has its own encoder; --encoder goes with --images")
        engine = SearchEngine.open(engine_dir, cache_dir=cache)
    else:
        engine = SearchEngine.temporary(load_encoder(encoder_name), cache_dir=cache)
        report = engine.add_images(_images(images), progress=False)
        for path, reason in report.failed:
            typer.echo(f"  failed {path}: {reason}", err=True)
    try:
        hits = engine.search_image(image, k=top, bbox=parse_bbox(bbox), query_expansion=qe)
    except SelretError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        rows = [
            {"rank": r, "id": h.id, "score": h.score, "path": h.path} for r, h in enumerate(hits, 1)
        ]
        typer.echo(
            json.dumps({"query": str(image), "bbox": parse_bbox(bbox), "results": rows}, indent=2)
        )
        return
    typer.echo(f"{'rank':>4}  {'score':>7}  path")
    for r, h in enumerate(hits, 1):
        typer.echo(f"{r:>4}  {h.score:7.4f}  {h.path}")
