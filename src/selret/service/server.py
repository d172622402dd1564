"""Running the HTTP search service: :func:`run` (uvicorn, until interrupted) and
:func:`serve_in_background` (a real server in a thread, for tests and benchmarks).

The app itself is :func:`selret.service.app.create_app` (routes, models, upload limits), over a
:class:`selret.service.state.SearchService` (the engine, the encode lock, statistics, thumbnails);
both are re-exported here, so ``from selret.service.server import create_app, run`` keeps working.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI

from selret.service.app import DEFAULT_MAX_UPLOAD_BYTES, create_app, error_status
from selret.service.state import SearchService, Thumbnail

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "SearchService",
    "Thumbnail",
    "create_app",
    "error_status",
    "run",
    "serve_in_background",
]


def run(
    engine_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    cache_dir: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    log_level: str = "info",
) -> None:
    """Serve the engine at ``engine_dir`` with uvicorn until interrupted (one process)."""
    import uvicorn

    app = create_app(engine_dir, cache_dir=cache_dir, max_upload_bytes=max_upload_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextmanager
def serve_in_background(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 120.0
) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server in a thread; yields its base URL, stops on exit.

    ``port=0`` picks a free port (the socket is bound here, so there is no race for it). Raises
    RuntimeError if the server does not start within ``timeout`` seconds (e.g. the engine cannot
    be opened: uvicorn logs why).
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit:
            pass  # uvicorn exits on a failed startup (already logged); seen below as not started

    thread = threading.Thread(target=serve, name="selret-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the selret server did not start (see the log above)")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
