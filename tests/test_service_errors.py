"""Every selret error maps to a 4xx or a 503 with its reason (selret.service.app.error_status), and
server-side errors reach clients without the server's directories."""

from __future__ import annotations

import inspect

import httpx
import pytest
from server_fixtures import image_paths, shared_engine

import selret.errors
from selret.errors import SelretError
from selret.service import batching, state
from selret.service.app import error_detail, error_status


def selret_error_classes() -> list[type[SelretError]]:
    modules = (selret.errors, batching, state)
    found = {
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, SelretError)
    }
    return sorted(found, key=lambda c: c.__name__)


def instance(cls: type[SelretError]) -> SelretError:
    if cls is batching.ServiceBusyError:
        return cls(3, 3, 7)
    params = inspect.signature(cls.__init__).parameters
    if "reason" in params:
        return cls("/srv/images/secret/file.jpg", "broken")
    return cls("/srv/engine/index: something is wrong")


@pytest.mark.parametrize("cls", selret_error_classes(), ids=lambda c: c.__name__)
def test_every_selret_error_is_4xx_or_503(cls):
    status = error_status(instance(cls))
    assert 400 <= status < 500 or status == 503, (cls, status)


def test_the_statuses_of_the_documented_errors():
    from selret.errors import (
        BoundingBoxError,
        CacheError,
        CorruptImageError,
        CorruptIndexError,
        EmptyImageError,
        ImageTooLargeError,
        ImageTooSmallError,
        WeightsError,
    )  # fmt: skip

    cases = {
        EmptyImageError: 400, CorruptImageError: 415, ImageTooLargeError: 413,
        ImageTooSmallError: 422, BoundingBoxError: 422, state.IndexedImageGoneError: 404,
        state.IndexedImageChangedError: 409, state.NetworkError: 503, CacheError: 503,
        CorruptIndexError: 503, WeightsError: 503, batching.ServiceBusyError: 503,
    }  # fmt: skip
    for cls, status in cases.items():
        assert error_status(instance(cls)) == status, cls


def test_server_side_reasons_show_no_directory():
    from selret.errors import CacheError

    detail = error_detail(CacheError("/home/op/.cache/selret/features/ab/cd.npz: bad zip file"))
    assert detail == "cd.npz: bad zip file"
    # An image error names the client's label only (an upload name or "indexed image N (name)").
    assert error_detail(selret.errors.CorruptImageError("query.jpg", "truncated")) == (
        "query.jpg: truncated"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from selret.service.server import create_app, serve_in_background

    app = create_app(shared_engine(tmp_path_factory))
    with serve_in_background(app) as url:
        yield app, url


@pytest.mark.parametrize(
    "error",
    [
        selret.errors.CorruptIndexError("/srv/engine/index/state-3/vectors.faiss: unreadable"),
        selret.errors.CacheError("/var/cache/selret/x.npz: cannot write"),
        selret.errors.SelretError("/opt/a/b: a condition nobody mapped"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_server_side_error_in_a_search_is_503_without_paths(
    server, tmp_path_factory, error, monkeypatch
):
    app, url = server
    index = app.state.service.engine.index

    def failing_search(*args, **kwargs):
        raise error

    monkeypatch.setattr(index, "search", failing_search)
    query = image_paths(shared_engine(tmp_path_factory))[0].read_bytes()
    response = httpx.post(f"{url}/search", files={"image": ("q.jpg", query)}, timeout=120)
    assert response.status_code == 503, response.text
    detail = response.json()["detail"]
    assert "/srv" not in detail and "/var" not in detail and "/opt" not in detail
    assert detail.split(": ", 1)[1] == str(error).split(": ", 1)[1]
    monkeypatch.undo()
    ok = httpx.post(f"{url}/search", files={"image": ("q.jpg", query)}, timeout=120)
    assert ok.status_code == 200
