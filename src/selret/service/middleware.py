"""ASGI middleware of the search service: :class:`SearchGuard` and :class:`ApiKeyAuth`.

Both answer before the app reads a byte of the request body where they can, so that a refused
request costs the server nothing but its head. The connection stays open after a refusal: uvicorn
discards the rest of the body as it arrives (closing at once would reset the connection under a
client still sending, which then never reads the answer), and the server's head deadline
(:class:`selret.service.server.HeaderTimeoutH11`) closes it if that drags on. Only an upload that
is too slow is answered with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from selret.service.batching import Admission, ServiceBusyError

__all__ = ["OPEN_PATHS", "ApiKeyAuth", "SearchGuard", "refusal"]

#: Paths that never need the API key: liveness, and the web page, its files and the API schema,
#: which are the same for every installation and show no data.
OPEN_PATHS = frozenset({"/health", "/", "/openapi.json"})
OPEN_PREFIXES = ("/static/",)

_CLOSE = {"Connection": "close"}


def refusal(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error answer ``{"detail": ...}``."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class SearchGuard:
    """Bounds what one POST /search may cost before the app sees it.

    - **admission**: a search past ``admission.limit`` in progress is refused with 503 and
      Retry-After, before its body is read;
    - **size**: a declared Content-Length over ``max_body_bytes`` is refused with 413 unread; a
      body without one is counted as it streams in and cut off with 413 past the limit;
    - **time**: the whole body must arrive within ``body_timeout_s`` seconds of the request head,
      else 408 (a slow upload holds a connection and a search slot, so it cannot be left to run).
    """

    def __init__(
        self,
        app,
        admission: Admission,
        max_body_bytes: int,
        too_large: str,
        body_timeout_s: float,
    ):
        self.app = app
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.too_large = too_large
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/search" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await refusal(413, self.too_large)(scope, receive, send)
        try:
            self.admission.enter()
        except ServiceBusyError as exc:
            headers = {"Retry-After": str(exc.retry_after)}
            return await refusal(503, str(exc), headers)(scope, receive, send)
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            self.admission.leave()

    def _limited(self, receive):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        seen = 0
        body_done = False
        timeout = (
            f"request body not received within {self.body_timeout_s:g} s: "
            "upload faster or send a smaller image"
        )

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # later receives wait for a disconnect: no deadline on those
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                # FastAPI re-raises an HTTPException from body parsing as it is.
                raise HTTPException(408, timeout, headers=_CLOSE) from None
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise HTTPException(413, self.too_large)
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return limited_receive


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class ApiKeyAuth:
    """Requires the API key on every path but :data:`OPEN_PATHS` (and ``/static/``).

    The key comes in ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``. It is compared in
    constant time (of the SHA-256 digests, so not even its length leaks); a missing or wrong key
    gets 401 before the request body is read.
    """

    def __init__(self, app, api_key: str):
        self.app = app
        self._digest = _digest(api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        presented = self._presented(scope["headers"])
        if presented is None or not hmac.compare_digest(_digest(presented), self._digest):
            detail = (
                "missing API key: send it as `X-API-Key: KEY` or `Authorization: Bearer KEY`"
                if presented is None
                else "wrong API key"
            )
            response = refusal(401, detail, {"WWW-Authenticate": 'Bearer realm="selret"'})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def _presented(headers) -> str | None:
        for name, value in headers:
            if name == b"x-api-key":
                return value.decode("latin-1").strip()
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return token.strip()
        return None
