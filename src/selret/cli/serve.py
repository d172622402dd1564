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
    query_max_mp: float = typer.Option(
        16.0,
        "--query-max-mp",
        min=0.001,
        help="Largest query image in megapixels (width x height, read from the header before "
        "decoding; indexing allows 64).",
    ),
    draft: bool = typer.Option(
        True,
        "--draft/--no-draft",
        help="Decode JPEG queries at reduced size (memory follows the network input, not the file).",
    ),
    batch_size: int = typer.Option(
        8,
        "--batch-size",
        min=1,
        max=256,
        help="Most concurrent queries run as one backbone forward, encode and index search "
        "(1: one query at a time).",
    ),
    batch_wait_ms: float = typer.Option(
        5.0,
        "--batch-wait-ms",
        min=0.0,
        max=1000.0,
        help="Longest wait for more queries once one is ready (only while others are decoding).",
    ),
    forward_max_mp: float = typer.Option(
        2.0,
        "--forward-max-mp",
        min=0.001,
        help="Most input megapixels per backbone forward (a batch of large queries is split): "
        "bounds the network's memory, about 0.5 GB per 1024 x 768 query on CPU.",
    ),
    max_queue: int = typer.Option(
        64,
        "--max-queue",
        min=1,
        help="Searches in progress at once (decoding, waiting, running); more get 503 with "
        "Retry-After.",
    ),
    decode_workers: int | None = typer.Option(
        None, "--decode-workers", min=1, help="Threads decoding query images [min(4, cores)]."
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", min=0.1, help="Seconds an upload may take; slower ones get 408."
    ),
    header_timeout: float = typer.Option(
        10.0,
        "--header-timeout",
        min=0.1,
        help="Seconds a connection may take to send a request head before it is closed.",
    ),
    keep_alive: int = typer.Option(
        5, "--keep-alive", min=1, help="Seconds an idle keep-alive connection stays open."
    ),
    max_connections: int = typer.Option(
        256,
        "--max-connections",
        min=1,
        help="Open connections and requests in progress; beyond it requests get 503.",
    ),
    api_key_file: Path | None = typer.Option(
        None,
        "--api-key-file",
        help="Require this API key (first line of the file) on every endpoint but /health, as "
        "`X-API-Key: KEY` or `Authorization: Bearer KEY` [$SELRET_API_KEY; none: no key].",
    ),
    cors_origins: list[str] = typer.Option(
        [],
        "--cors-origin",
        help="Let web pages of this origin (https://host[:port], or *) call the API; repeatable "
        "[none].",
    ),
    log_level: str = typer.Option(
        "info", help="uvicorn log level: critical, error, warning, info, debug."
    ),
) -> None:
    """Serve POST /search, GET /images/{id}, /stats, /openapi.json and the web page at http://HOST:PORT/."""
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
    from selret.service.config import ServiceConfig, key_file_is_shared, read_api_key

    options = {} if decode_workers is None else {"decode_workers": decode_workers}
    config = ServiceConfig(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        query_max_pixels=int(query_max_mp * 1_000_000),
        draft=draft,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
        forward_max_pixels=int(forward_max_mp * 1_000_000),
        max_queue=max_queue,
        body_timeout_s=body_timeout,
        header_timeout_s=header_timeout,
        keep_alive_s=keep_alive,
        max_connections=max_connections,
        api_key=read_api_key(api_key_file),
        cors_origins=tuple(cors_origins),
        **options,
    )
    if api_key_file is not None and key_file_is_shared(api_key_file):
        typer.echo(
            f"selret: warning: {api_key_file} is readable by other users (chmod 600 it)", err=True
        )
    access = "API key required" if config.api_key else "no API key"
    typer.echo(
        f"selret: serving {engine_dir} at http://{host}:{port}/ ({access}; API schema at /openapi.json)"
    )
    if config.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"selret: warning: listening on {host} without an API key: anyone who can reach "
            "the port can search and read thumbnails (set $SELRET_API_KEY or --api-key-file)",
            err=True,
        )
    run(engine_dir, host=host, port=port, cache_dir=cache, config=config, log_level=log_level)
