"""``selret serve``: the HTTP search API and web page over an engine directory."""

from __future__ import annotations

from pathlib import Path

import typer

from selret.cli._app import app
from selret.cli.encoder import ENCODER_HELP, load_encoder


@app.command()
def serve(
    engine_dir: Path = typer.Argument(..., help="An engine directory (from `selret index build`)."),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Build ENGINE_DIR from this folder first when it is not an index yet (with "
        "--encoder or the default pre-trained encoder); an existing index gets the new images.",
    ),
    encoder_name: str | None = typer.Option(
        None, "--encoder", "-e", help="With --images, for a new index: " + ENCODER_HELP
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Interface to listen on (0.0.0.0: all; mind who can reach it)."
    ),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    cache: Path | None = typer.Option(
        None, help="Feature cache [$SELRET_CACHE or ~/.cache/selret/features]."
    ),
    max_upload_mb: float = typer.Option(
        10.0, "--max-upload-mb", min=0.001, help="Largest accepted query image, in MiB."
    ),
    log_level: str = typer.Option(
        "info", help="uvicorn log level: critical, error, warning, info, debug."
    ),
) -> None:
    """Serve POST /search, GET /images/{id}, /stats, /docs and the web page at http://HOST:PORT/."""
    from selret.search.engine import ENCODER_FILE, INDEX_DIR, SearchEngine
    from selret.service.server import run

    if images is not None:
        from selret.cli.index import _images, _print_add_report

        if (engine_dir / ENCODER_FILE).is_file():
            engine = SearchEngine.open(engine_dir, cache_dir=cache)
        else:
            engine = SearchEngine.create(engine_dir, load_encoder(encoder_name), cache_dir=cache)
        _print_add_report(engine.add_images(_images(images)))

    # Checked here for a one-line error; uvicorn would report it as a startup traceback.
    if not (engine_dir / ENCODER_FILE).is_file() or not (engine_dir / INDEX_DIR).is_dir():
        raise typer.BadParameter(
            f"{engine_dir}: not a selret engine (no {ENCODER_FILE} and {INDEX_DIR}/); build one with `selret index build`",
            param_hint="ENGINE_DIR",
        )
    typer.echo(f"selret: serving {engine_dir} at http://{host}:{port}/ (API docs at /docs)")
    run(
        engine_dir,
        host=host,
        port=port,
        cache_dir=cache,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        log_level=log_level,
    )
