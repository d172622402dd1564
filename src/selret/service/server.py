"""Running the HTTP search service: :func:`run` (uvicorn, until interrupted) and
:func:`serve_in_background` (a real server in a thread, for tests and benchmarks).

Both run uvicorn with the connection limits of the app's
:class:`~selret.service.config.ServiceConfig` (:func:`uvicorn_config`): idle keep-alive connections
close after ``keep_alive_s``; more than ``max_connections`` open connections or requests get 503;
and a request head must arrive within ``header_timeout_s`` (:class:`HeaderTimeoutH11`: uvicorn's
own h11 protocol never times out a connection that has sent nothing or half a head, so slow-loris
clients could otherwise hold connections forever and, with the connection cap, lock everyone out).

The app itself is :func:`selret.service.app.create_app`; it and the service are re-exported here,
so ``from selret.service.server import create_app, run`` keeps working.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from selret.service.app import DEFAULT_MAX_UPLOAD_BYTES, create_app, error_status
from selret.service.config import ServiceConfig
from selret.service.state import SearchService, Thumbnail

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "HeaderTimeoutH11",
    "SearchService",
    "ServiceConfig",
    "Thumbnail",
    "create_app",
    "error_status",
    "run",
    "serve_in_background",
    "uvicorn_config",
]


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request head.

    The deadline starts when the connection opens and again when a response completes; if no
    request is in progress when it passes, the connection is closed (no answer: the client has
    not asked anything). ``header_timeout_s`` is set on the subclass :func:`uvicorn_config` makes.
    """

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_deadline = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: FastAPI, log_level: str = "info", **options):
    """The ``uvicorn.Config`` of ``app`` with the connection limits of its ServiceConfig."""
    import uvicorn

    config: ServiceConfig = getattr(app.state, "selret_config", None) or ServiceConfig()
    protocol = type("SelretH11", (HeaderTimeoutH11,), {"header_timeout_s": config.header_timeout_s})
    return uvicorn.Config(
        app,
        log_level=log_level,
        http=protocol,
        timeout_keep_alive=config.keep_alive_s,
        limit_concurrency=config.max_connections,
        lifespan="on",
        **options,
    )


def run(
    engine_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    cache_dir: str | Path | None = None,
    config: ServiceConfig | None = None,
    log_level: str = "info",
    **settings,
) -> None:
    """Serve the engine at ``engine_dir`` with uvicorn until interrupted (one process).

    ``config`` and keyword ``settings`` (its fields) are those of :func:`create_app`.
    """
    import uvicorn

    app = create_app(engine_dir, cache_dir=cache_dir, config=config, **settings)
    uvicorn.Server(uvicorn_config(app, log_level, host=host, port=port)).run()


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
    server = uvicorn.Server(uvicorn_config(app, "warning"))

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
