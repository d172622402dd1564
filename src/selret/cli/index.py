"""``selret index build|add|sync|remove|info|verify`` and ``selret search``: a persistent
searchable index that follows its image files by content."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from selret.cli._app import app
from selret.cli._scan import images as _images
from selret.cli.encoder import ENCODER_HELP, load_encoder

index_app = typer.Typer(
    help="Create and maintain a persistent image index (encoder + faiss vectors + SQLite catalog).",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")

ENGINE_HELP = "Index directory (holds encoder.npz and index/)."
TARGETS_HELP = "IMAGES (a folder or a list file) with --index DIR, or the older ENGINE_DIR IMAGES."
LOCK_TIMEOUT_HELP = (
    "Seconds to wait for another writer of the same index to finish (the work done so far is "
    "kept while waiting)."
)
DEFAULT_LOCK_TIMEOUT = 600.0


def _print_failures(failed) -> None:
    for path, reason in failed:
        typer.echo(f"  failed {path}: {reason}", err=True)


def _print_add_report(report) -> None:
    typer.echo(report.summary())
    _print_failures(report.failed)


def _targets(args: list[Path], index_dir: Path | None) -> tuple[Path, Path]:
    """(engine dir, images) from ``IMAGES --index DIR`` or the older ``ENGINE_DIR IMAGES``."""
    if index_dir is not None and len(args) == 1:
        return index_dir, args[0]
    if index_dir is None and len(args) == 2:
        return args[0], args[1]
    raise typer.BadParameter("give IMAGES --index DIR (or ENGINE_DIR IMAGES)")


def _engine_dir(arg: Path | None, index_dir: Path | None) -> Path:
    if (arg is None) == (index_dir is None):
        raise typer.BadParameter("give the index as --index DIR (or as the argument ENGINE_DIR)")
    return arg if arg is not None else index_dir


def _waiting(engine_dir: Path, timeout: float):
    def on_wait(holder: str) -> None:
        typer.echo(
            f"{engine_dir}: waiting for another writer ({holder}) to finish, up to {timeout:g} s "
            "(--lock-timeout)",
            err=True,
        )

    return on_wait


@index_app.command("build")
def build(
    args: list[Path] = typer.Argument(..., help=TARGETS_HELP),
    index_dir: Path | None = typer.Option(None, "--index", "-i", help=ENGINE_HELP),
    encoder_name: str | None = typer.Option(None, "--encoder", "-e", help=ENCODER_HELP),
    learn: Path | None = typer.Option(
        None, help="Fit a new encoder on these held-out images instead of --encoder."
    ),
    preset: str | None = typer.Option(None, help="Preset for --learn [temb-demo-512]."),
    mask: str | None = typer.Option(None, help="Mask for --learn [max]."),
    max_side: int | None = typer.Option(None, "--max-side", help="Image size for --learn [1024]."),
    weights: str | None = typer.Option(None, help="Backbone weights for --learn [vgg16-caffe]."),
    kind: str = typer.Option(
        "exact",
        help="exact, hnsw, ivfpq, ivf, binary or auto (exact below 20k vectors, ivf above).",
    ),
    cache: Path | None = typer.Option(
        None, help="Feature cache [$SELRET_CACHE or ~/.cache/selret/features]."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an index already at DIR (once the new one is complete)."
    ),
) -> None:
    """Create an index of IMAGES with an encoder (default: the default pre-trained one, or one fitted
    on --learn). All or nothing: built in a temporary folder and renamed to DIR at the end; fails
    (exit 3) and leaves nothing when no image could be indexed."""
    from selret.encoding.encoder import Encoder
    from selret.errors import NoImagesError
    from selret.search.engine import SearchEngine, check_build_target

    engine_dir, images = _targets(args, index_dir)
    if encoder_name is not None and learn is not None:
        raise typer.BadParameter("give at most one of --encoder and --learn")
    check_build_target(engine_dir, force)  # before any encoder is loaded or fitted
    paths = _images(images)
    if learn is None:
        encoder = load_encoder(encoder_name)
    else:
        from selret.cli.encoder import config_from_options
        from selret.features.extractor import Extractor

        config = config_from_options(preset, dict(mask=mask, max_side=max_side, weights=weights))
        maps = Extractor.for_config(config, cache=cache).maps(_images(learn))
        encoder = Encoder(config).fit(maps, progress=True)
    try:
        engine, report = SearchEngine.build(
            engine_dir, encoder, paths, kind=kind, cache_dir=cache, force=force
        )
    except NoImagesError as exc:
        _print_failures(getattr(exc, "failed", []))
        raise
    _print_add_report(report)
    typer.echo(f"{engine_dir}: {len(engine.index)} images, {encoder!r}")


REHASH_HELP = (
    "Read and hash every file, also those whose size, mtime and inode are as recorded "
    "(by default these are taken as unchanged without being read)."
)


def _update_command(args, index_dir, cache, lock_timeout, sync: bool, rehash: bool) -> None:
    from selret.search.engine import SearchEngine

    engine_dir, images = _targets(args, index_dir)
    engine = SearchEngine.open(engine_dir, cache_dir=cache)  # fails fast on a bad index
    paths = _images(images)
    waits = dict(
        lock_timeout=lock_timeout, on_wait=_waiting(engine_dir, lock_timeout), rehash=rehash
    )
    if sync:
        folder = images if images.is_dir() else None
        report = engine.sync_images(paths, folder=folder, **waits)
    else:
        report = engine.add_images(paths, **waits)
    _print_add_report(report)
    typer.echo(f"{engine_dir}: {len(engine.index)} images")


@index_app.command("add")
def add(
    args: list[Path] = typer.Argument(..., help=TARGETS_HELP),
    index_dir: Path | None = typer.Option(None, "--index", "-i", help=ENGINE_HELP),
    cache: Path | None = typer.Option(None, help="Feature cache."),
    lock_timeout: float = typer.Option(
        DEFAULT_LOCK_TIMEOUT, "--lock-timeout", min=0, help=LOCK_TIMEOUT_HELP
    ),
    rehash: bool = typer.Option(False, "--rehash", help=REHASH_HELP),
) -> None:
    """Add images to an index: new files are encoded, files whose content (sha256) changed are
    re-encoded ("updated"), unchanged ones are skipped. A file whose size, mtime and inode are
    those recorded when it was hashed is not read again (--rehash reads every file)."""
    _update_command(args, index_dir, cache, lock_timeout, sync=False, rehash=rehash)


@index_app.command("sync")
def sync(
    args: list[Path] = typer.Argument(..., help=TARGETS_HELP),
    index_dir: Path | None = typer.Option(None, "--index", "-i", help=ENGINE_HELP),
    cache: Path | None = typer.Option(None, help="Feature cache."),
    lock_timeout: float = typer.Option(
        DEFAULT_LOCK_TIMEOUT, "--lock-timeout", min=0, help=LOCK_TIMEOUT_HELP
    ),
    rehash: bool = typer.Option(False, "--rehash", help=REHASH_HELP),
) -> None:
    """Bring an index in step with IMAGES: as `index add`, and also remove the entries of deleted
    files (indexed images under the IMAGES folder, or listed in the IMAGES list file, whose file
    no longer exists). Entries from elsewhere are left alone."""
    _update_command(args, index_dir, cache, lock_timeout, sync=True, rehash=rehash)


@index_app.command("remove")
def remove(
    args: list[str] = typer.Argument(
        ..., help="ENGINE_DIR then image paths (or catalog ids); with --index DIR, only those."
    ),
    index_dir: Path | None = typer.Option(None, "--index", "-i", help=ENGINE_HELP),
    lock_timeout: float = typer.Option(
        DEFAULT_LOCK_TIMEOUT, "--lock-timeout", min=0, help=LOCK_TIMEOUT_HELP
    ),
) -> None:
    """Remove images from an index."""
    from selret.search.engine import SearchEngine

    if index_dir is None:
        if len(args) < 2:
            raise typer.BadParameter("give ENGINE_DIR PATHS... (or --index DIR PATHS...)")
        index_dir, args = Path(args[0]), args[1:]
    engine = SearchEngine.open(index_dir)
    items = [int(p) if p.isdigit() else p for p in args]
    n = engine.remove_images(
        items, lock_timeout=lock_timeout, on_wait=_waiting(index_dir, lock_timeout)
    )
    typer.echo(f"removed {n}; {len(engine.index)} images left")


@index_app.command("info")
def info(
    engine_arg: Path | None = typer.Argument(None, metavar="[ENGINE_DIR]", help=ENGINE_HELP),
    index_dir: Path | None = typer.Option(None, "--index", "-i", help=ENGINE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Describe an index: size, dimension, index kind, encoder."""
    from selret.search.engine import SearchEngine

    data = SearchEngine.open(_engine_dir(engine_arg, index_dir)).info()
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


@index_app.command("verify")
def verify(
    engine_arg: Path | None = typer.Argument(None, metavar="[ENGINE_DIR]", help=ENGINE_HELP),
    index_dir: Path | None = typer.Option(None, "--index", "-i", help=ENGINE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Check an index: vectors and catalog agree (faiss count = catalog rows), the manifest names
    the encoder beside it, and every indexed file exists with the sha256 it was encoded with.
    Prints the stale and missing entries; exits 4 when anything is inconsistent."""
    from selret.search.verify import verify_engine

    report = verify_engine(_engine_dir(engine_arg, index_dir))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for label, entries in (
            ("stale", report.stale),
            ("missing", report.missing),
            ("no sha256", report.unrecorded),
        ):
            for path, detail in entries:
                typer.echo(f"{label}: {path}: {detail}")
        for problem in report.problems:
            typer.echo(f"mismatch: {problem}")
        for name in report.leftovers:
            typer.echo(
                f"note: {name}: left by an interrupted save; never read, removed by the next"
            )
        typer.echo(f"{report.root}: {report.counts()}")
    if not report.consistent:
        raise report.error()


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
    from selret.search.engine import SearchEngine

    if (engine_dir is None) == (images is None):
        raise typer.BadParameter("give --index DIR or --images FOLDER")
    if engine_dir is not None:
        if encoder_name is not None:
            raise typer.BadParameter("an index has its own encoder; --encoder goes with --images")
        engine = SearchEngine.open(engine_dir, cache_dir=cache)
    else:
        engine = SearchEngine.temporary(load_encoder(encoder_name), cache_dir=cache)
        _print_failures(engine.add_images(_images(images), progress=False).failed)
    # A query that cannot be used (unreadable, box outside it) ends with its one-line error.
    hits = engine.search_image(image, k=top, bbox=parse_bbox(bbox), query_expansion=qe)
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
