"""The HTTP search API: a FastAPI app over one :class:`~selret.search.engine.SearchEngine`, and its web page.

    POST /search          query by an uploaded image (or an indexed image's id), optional box
    GET  /images/{id}     JPEG thumbnail of an indexed image, by catalog id only
    GET  /health          liveness (never needs the API key)
    GET  /stats           index size, encoder, uptime, searches served, latency, batching
    GET  /                the web page (``selret/service/web/``); /static/{name} its script and style
    GET  /openapi.json    the OpenAPI schema (``/docs`` is served only where its assets are
                          installed locally: the stock page loads them from a CDN)

The engine is opened once, at startup, and shared by all requests through a
:class:`~selret.service.state.SearchService`, which decodes queries in a bounded pool and runs the
network, the encoder and the index search on micro-batches of concurrent queries. The event loop
only awaits their futures, so it keeps serving meanwhile.

Client input is never a file-system path: uploads are bytes (their file name is only a label in
messages), and indexed images are looked up by integer catalog id. Every selret error is a known
condition and gets a 4xx (the request's fault) or a 503 (the server's), with its reason
(:func:`error_status`); a 500 means a bug.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from selret.errors import (
    BoundingBoxError,
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageTooSmallError,
    SelretError,
)
from selret.features.io import parse_bbox
from selret.search.engine import SearchEngine
from selret.search.hits import SearchHit
from selret.service.batching import Admission, ServiceBusyError
from selret.service.config import (
    DEFAULT_MAX_UPLOAD_BYTES,
    MAX_THUMBNAIL_SIDE,
    MIN_THUMBNAIL_SIDE,
    ServiceConfig,
)
from selret.service.middleware import ApiKeyAuth, SearchGuard
from selret.service.state import (
    IndexedImageChangedError,
    IndexedImageGoneError,
    NetworkError,
    SearchService,
)

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "ErrorResponse",
    "SearchResponse",
    "SearchResult",
    "create_app",
    "error_detail",
    "error_status",
]

logger = logging.getLogger(__name__)

#: Room for the multipart framing and the small form fields around the image in a POST /search
#: body: the body as a whole may exceed ``max_upload_bytes`` by this much, the image may not.
FORM_OVERHEAD_BYTES = 64 * 1024

#: Largest catalog id accepted: SQLite integers are signed 64-bit, and a larger Python int would
#: fail inside the catalog query instead of being a clean 422.
MAX_ID = 2**63 - 1

MAX_TOP_K = 100
MAX_QUERY_EXPANSION = 50

# HTTP status of each selret error: the first class of the error's MRO found here wins. 4xx: the
# request cannot be served as sent; 409: an indexed file no longer matches the index; 503: the
# server cannot serve it now (busy, or a server-side condition such as a broken cache or index).
_ERROR_STATUS: dict[type[SelretError], int] = {
    IndexedImageGoneError: 404,
    IndexedImageChangedError: 409,
    NetworkError: 503,
    EmptyImageError: 400,
    CorruptImageError: 415,
    ImageTooLargeError: 413,
    ImageTooSmallError: 422,
    BoundingBoxError: 422,
    ImageNotFoundError: 404,
    ImageError: 400,
    ServiceBusyError: 503,
    SelretError: 503,
}

# An absolute path in a server-side error message: only its last part is shown to clients.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s:'\"/]+/)+([^\s:'\"/]*)")

# The web page's files: a fixed list, so no request can name any other file.
_WEB_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def error_status(error: SelretError) -> int:
    """The HTTP status code of a selret error (never 500)."""
    return next(_ERROR_STATUS[c] for c in type(error).__mro__ if c in _ERROR_STATUS)


def error_detail(error: SelretError) -> str:
    """The one-line reason a client gets: image errors name the client's label (upload name or
    indexed image), other errors show no directory of the server."""
    if isinstance(error, ImageError):
        return str(error)
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "/", str(error))


# ===================================================================== HTTP models


class SearchResult(BaseModel):
    """One hit of a search."""

    rank: int = Field(description="1 for the best match.")
    id: int = Field(description="Catalog id of the indexed image.")
    score: float = Field(description="Inner product of the unit-norm vectors (cosine similarity).")
    thumbnail_url: str = Field(description="URL of the image's JPEG thumbnail.")
    width: int | None = Field(
        description="Width of the image as indexed (catalog; longest side = encoder max_side)."
    )
    height: int | None = Field(description="Height of the image as indexed (catalog).")
    name: str = Field(description="File name of the image (no directory).")


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float = Field(description="Server time of the search, from the decoded request on.")
    dim: int = Field(description="Dimension of the global vectors.")


class ErrorResponse(BaseModel):
    detail: str = Field(description="Why the request was refused.")


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 409, 413, 415, 422, 503)}


# ===================================================================== the app


def _web_file(name: str) -> bytes:
    return (resources.files("selret.service") / "web" / name).read_bytes()


def _hit_json(rank: int, hit: SearchHit, record) -> SearchResult:
    return SearchResult(
        rank=rank,
        id=hit.id,
        score=hit.score,
        thumbnail_url=f"/images/{hit.id}",
        width=record.width,
        height=record.height,
        name=Path(hit.path).name,
    )


def create_app(
    engine_dir: str | Path,
    cache_dir: str | Path | None = None,
    config: ServiceConfig | None = None,
    **settings,
) -> FastAPI:
    """The search app over the engine at ``engine_dir`` (opened at startup, once).

    ``config`` holds the limits, timeouts, batching and access settings; keyword ``settings``
    override its fields (``create_app(d, max_upload_bytes=..., thumbnail_size=...)``). Raises
    ValueError for an invalid setting.
    """
    config = (config or ServiceConfig()).replace(**settings)
    max_upload_bytes = config.max_upload_bytes
    admission = Admission(config.max_queue)
    web = {name: _web_file(name) for name in _WEB_FILES}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await run_in_threadpool(SearchEngine.open, engine_dir, cache_dir)
        service = SearchService(engine, config, admission)
        try:
            await run_in_threadpool(service.warm_up)
            app.state.service = service
            yield
        finally:
            service.close()

    app = FastAPI(
        title="selret image search",
        description=(
            "Image retrieval with selective deep convolutional features (Hoang et al., ACM MM 2017). "
            "Upload a query image (optionally with a box around the object of interest) and get the "
            "most similar indexed images."
            + (
                " Every endpoint but /health needs the API key, as `X-API-Key: KEY` or "
                "`Authorization: Bearer KEY`."
                if config.api_key
                else ""
            )
        ),
        version=_version(),
        lifespan=lifespan,
        # The stock /docs and /redoc pages load their scripts from a CDN, blank offline: off.
        docs_url=None,
        redoc_url=None,
    )
    # What the server around the app reads (selret.service.server.uvicorn_config).
    app.state.selret_config = config
    too_large = f"upload too large: the limit is {max_upload_bytes} bytes per query image"
    # Starlette runs the middleware added last first: CORS (answers preflights), then the key,
    # then the guard of POST /search.
    app.add_middleware(
        SearchGuard,
        admission=admission,
        max_body_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES,
        too_large=too_large,
        body_timeout_s=config.body_timeout_s,
    )
    if config.api_key:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
            expose_headers=["X-Image-Width", "X-Image-Height", "Retry-After"],
            max_age=600,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable sentence in `detail` (what the web page shows), the full list beside it.
        errors = exc.errors()
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('body', 'query', 'path'))}: {e['msg']}"
            for e in errors
        )
        return JSONResponse({"detail": detail, "errors": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(SelretError)
    async def selret_error(request: Request, exc: SelretError) -> JSONResponse:
        status = error_status(exc)
        body = {"detail": error_detail(exc)}
        if exc.hint:
            body["hint"] = exc.hint
        headers = {}
        if isinstance(exc, ServiceBusyError):
            headers["Retry-After"] = str(exc.retry_after)
        if status == 503 and not isinstance(exc, ServiceBusyError):
            logger.warning(
                "%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc
            )
        return JSONResponse(body, status_code=status, headers=headers)

    def service_of(request: Request) -> SearchService:
        return request.app.state.service

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses=_ERRORS,
        summary="Search by image",
        description=(
            "Query with an uploaded image (`image`) or with an indexed image (`id`, exactly one of "
            "the two). `bbox` restricts the query to a box given in pixels of the upright original "
            "image. Errors: 400 empty upload or both/neither of image and id, 401 missing or wrong "
            "API key, 404 unknown id or its file is gone, 408 upload too slow, 409 the indexed "
            "file changed on disk, 413 file or pixel count too large, 415 not a decodable image, "
            "422 bad parameters, box or too small an image, 503 busy (see Retry-After)."
        ),
    )
    async def search(
        request: Request,
        image: Annotated[
            UploadFile | None, File(description="The query image (JPEG, PNG, WebP, TIFF...).")
        ] = None,
        image_id: Annotated[
            int | None,
            Form(alias="id", ge=1, le=MAX_ID, description="Query with this indexed image instead."),
        ] = None,
        top_k: Annotated[int, Form(ge=1, le=MAX_TOP_K, description="Number of results.")] = 10,
        bbox: Annotated[
            str | None, Form(description="Query box 'x1,y1,x2,y2' in original-image pixels.")
        ] = None,
        query_expansion: Annotated[
            int,
            Form(
                ge=0,
                le=MAX_QUERY_EXPANSION,
                description="Average query expansion: re-query with the top n.",
            ),
        ] = 0,
    ) -> SearchResponse:
        service = service_of(request)
        if (image is None) == (image_id is None):
            raise HTTPException(
                400, "send exactly one of `image` (a file) and `id` (an indexed image)"
            )
        if image is not None:
            data = await image.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise HTTPException(413, too_large)
            # The client's file name is a label for messages only, never opened.
            source, name = data, Path(image.filename or "upload").name or "upload"
        else:
            source, name = image_id, f"image {image_id}"
        start = time.perf_counter()
        box = parse_bbox(bbox)
        try:
            hits = await asyncio.wrap_future(
                service.submit_search(source, top_k, box, query_expansion, name)
            )
        except KeyError:
            raise HTTPException(404, f"no indexed image has id {image_id}") from None
        seconds = time.perf_counter() - start
        service.count_search(seconds)
        return SearchResponse(
            results=[
                _hit_json(rank, hit, service.record(hit.id)) for rank, hit in enumerate(hits, 1)
            ],
            took_ms=round(1000 * seconds, 3),
            dim=service.engine.index.dim,
        )

    @app.get(
        "/images/{image_id}",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail."}}
        | _ERRORS,
        summary="Thumbnail of an indexed image",
        description=(
            "JPEG of the indexed image with catalog id `image_id`, its longest side at most `size` "
            "pixels (never enlarged). Headers X-Image-Width / X-Image-Height give the size of the "
            "upright original, the pixel frame of a search `bbox`. Errors: 404 unknown id or its "
            "file is gone, 409 the file changed on disk into something unusable."
        ),
    )
    async def thumbnail(
        request: Request,
        image_id: Annotated[
            int, PathParam(ge=0, le=MAX_ID, description="Catalog id of the image.")
        ],
        size: Annotated[
            int | None,
            Query(
                ge=MIN_THUMBNAIL_SIDE,
                le=MAX_THUMBNAIL_SIDE,
                description="Longest side in pixels [server default].",
            ),
        ] = None,
    ) -> Response:
        service = service_of(request)
        try:
            thumb = await asyncio.wrap_future(
                service.submit_thumbnail(image_id, size or service.thumbnail_size)
            )
        except KeyError:
            raise HTTPException(404, f"no indexed image has id {image_id}") from None
        width, height = thumb.original_size
        headers = {
            "X-Image-Width": str(width),
            "X-Image-Height": str(height),
            "Cache-Control": "private, max-age=3600" if config.api_key else "public, max-age=3600",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(thumb.jpeg, media_type="image/jpeg", headers=headers)

    @app.get("/health", summary="Liveness", description="`{status: ok}` once the engine is open.")
    def health() -> dict:
        return {"status": "ok"}

    @app.get(
        "/stats",
        summary="Service statistics",
        description="Index size, vector dimension, index kind, encoder settings, uptime (s), "
        "searches served and their mean latency (ms), batches run and their mean size, "
        "searches in progress and refused as busy, and the limits in force.",
    )
    def stats(request: Request) -> dict:
        return service_of(request).stats()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> Response:
        return Response(web["index.html"], media_type=_WEB_FILES["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in web or name == "index.html":
            raise HTTPException(404, "no such file")
        return Response(
            web[name], media_type=_WEB_FILES[name], headers={"X-Content-Type-Options": "nosniff"}
        )

    return app


def _version() -> str:
    from selret import __version__

    return __version__
