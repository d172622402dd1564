"""The HTTP search API: a FastAPI app over one :class:`~selret.search.engine.SearchEngine`, and its web page.

    POST /search          query by an uploaded image (or an indexed image's id), optional box
    GET  /images/{id}     JPEG thumbnail of an indexed image, by catalog id only
    GET  /health          liveness
    GET  /stats           index size, encoder, uptime, searches served, mean latency
    GET  /                the web page (``selret/service/web/``); /static/{name} its script and style
    GET  /docs            OpenAPI documentation (FastAPI)

The engine is opened once, at startup, and shared by all requests through a
:class:`~selret.service.state.SearchService`. Encoding (image decode + CNN) runs in the thread
pool under its lock, so the event loop keeps serving while a query is encoded.

Client input is never a file-system path: uploads are bytes (their file name is only a label in
messages), and indexed images are looked up by integer catalog id. Bad input gets a 4xx with the
reason: the typed :class:`~selret.errors.ImageError` of :mod:`selret.features.io` maps to a status code.
"""

from __future__ import annotations

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
)
from selret.features.io import parse_bbox
from selret.search.engine import SearchEngine
from selret.search.hits import SearchHit
from selret.service.state import MAX_THUMBNAIL_SIDE, MIN_THUMBNAIL_SIDE, SearchService

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "ErrorResponse",
    "SearchResponse",
    "SearchResult",
    "create_app",
    "error_status",
]

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024

#: Room for the multipart framing and the small form fields around the image in a POST /search
#: body: the body as a whole may exceed ``max_upload_bytes`` by this much, the image may not.
FORM_OVERHEAD_BYTES = 64 * 1024

#: Largest catalog id accepted: SQLite integers are signed 64-bit, and a larger Python int would
#: fail inside the catalog query instead of being a clean 422.
MAX_ID = 2**63 - 1

MAX_TOP_K = 100
MAX_QUERY_EXPANSION = 50

# HTTP status of each ImageError: the first class of the error's MRO found here wins.
_IMAGE_ERROR_STATUS: dict[type[ImageError], int] = {
    EmptyImageError: 400,
    CorruptImageError: 415,
    ImageTooLargeError: 413,
    ImageTooSmallError: 422,
    BoundingBoxError: 422,
    ImageNotFoundError: 404,
    ImageError: 400,
}

# The web page's files: a fixed list, so no request can name any other file.
_WEB_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def error_status(error: ImageError) -> int:
    """The HTTP status code for an image error."""
    return next(_IMAGE_ERROR_STATUS[c] for c in type(error).__mro__ if c in _IMAGE_ERROR_STATUS)


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


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422)}


# ===================================================================== the app


class _BodyLimit:
    """ASGI middleware bounding the request body of POST /search while it streams in.

    A declared Content-Length over the limit is refused before any byte is read; otherwise the
    body is counted as it arrives and the request stops with 413 once past the limit, so neither
    memory nor the multipart spool file grows beyond it.
    """

    def __init__(self, app, max_body_bytes: int, detail: str):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.detail = detail

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/search" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": self.detail}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # FastAPI re-raises an HTTPException from body parsing as it is.
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, limited_receive, send)


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
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    thumbnail_size: int = 256,
) -> FastAPI:
    """The search app over the engine at ``engine_dir`` (opened at startup, once).

    ``max_upload_bytes`` bounds a query image's size; ``thumbnail_size`` is the longest side of
    the thumbnails ``GET /images/{id}`` returns by default.
    """
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    if not MIN_THUMBNAIL_SIDE <= thumbnail_size <= MAX_THUMBNAIL_SIDE:
        raise ValueError(
            f"thumbnail_size must be in {MIN_THUMBNAIL_SIDE}..{MAX_THUMBNAIL_SIDE}, got {thumbnail_size}"
        )
    web = {name: _web_file(name) for name in _WEB_FILES}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await run_in_threadpool(SearchEngine.open, engine_dir, cache_dir)
        service = SearchService(engine, thumbnail_size)
        await run_in_threadpool(service.warm_up)
        app.state.service = service
        yield

    app = FastAPI(
        title="selret image search",
        description=(
            "Image retrieval with selective deep convolutional features (Hoang et al., ACM MM 2017). "
            "Upload a query image (optionally with a box around the object of interest) and get the "
            "most similar indexed images."
        ),
        version=_version(),
        lifespan=lifespan,
    )
    too_large = f"upload too large: the limit is {max_upload_bytes} bytes per query image"
    app.add_middleware(
        _BodyLimit, max_body_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES, detail=too_large
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
            "image. Errors: 400 empty upload or both/neither of image and id, 413 too large, "
            "415 not a decodable image, 422 bad parameters, box or too small an image, 404 unknown id."
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
        try:
            box = parse_bbox(bbox)
            hits = await run_in_threadpool(
                service.search, source, top_k, box, query_expansion, name
            )
        except ImageError as e:
            raise HTTPException(error_status(e), f"{name}: {e.reason}") from None
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
            "upright original, the pixel frame of a search `bbox`."
        ),
    )
    def thumbnail(
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
            thumb = service.thumbnail(image_id, size or service.thumbnail_size)
        except KeyError:
            raise HTTPException(404, f"no indexed image has id {image_id}") from None
        except ImageNotFoundError as e:
            raise HTTPException(
                404, f"indexed image {image_id} is no longer readable: {e.reason}"
            ) from None
        width, height = thumb.original_size
        headers = {
            "X-Image-Width": str(width),
            "X-Image-Height": str(height),
            "Cache-Control": "public, max-age=3600",
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
        "searches served and their mean latency (ms).",
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
