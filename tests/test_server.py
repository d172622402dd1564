"""The HTTP service (selret.service.server) on a real uvicorn server over a small random-weights engine."""

from __future__ import annotations

import io
import re
import socket
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from server_fixtures import SIZES, image_paths, running_server, shared_engine

MAX_UPLOAD = 64 * 1024


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return shared_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def url(engine_dir):
    with running_server(engine_dir, max_upload_bytes=MAX_UPLOAD, thumbnail_size=64) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def images(engine_dir):
    return image_paths(engine_dir)


def upload(client, data: bytes, filename: str = "query.jpg", **fields):
    return client.post("/search", files={"image": (filename, data, "image/jpeg")}, data=fields)


def assert_refused(response, status: int, *words: str) -> str:
    """The response is a ``status`` error whose one-line reason mentions every word."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word in detail, detail
    return detail


# ----------------------------------------------------------------- searching


def test_each_indexed_image_finds_itself_first(client, images):
    for path in images:
        response = upload(client, path.read_bytes(), path.name, top_k="3")
        assert response.status_code == 200, response.text
        body = response.json()
        results = body["results"]
        assert len(results) == 3
        assert results[0]["name"] == path.name
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [r["rank"] for r in results] == [1, 2, 3]
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
        assert body["dim"] == 32 and body["took_ms"] > 0


def test_result_fields_name_no_server_path(client, images, engine_dir):
    response = upload(client, images[0].read_bytes(), top_k="8")
    results = response.json()["results"]
    assert sorted(r["name"] for r in results) == sorted(p.name for p in images)
    original = {p.name: Image.open(p).size for p in images}
    for r in results:
        assert set(r) == {"rank", "id", "score", "thumbnail_url", "width", "height", "name"}
        assert r["thumbnail_url"] == f"/images/{r['id']}"
        assert "/" not in r["name"]
        # The catalog keeps the original size (clients draw boxes in original pixels).
        assert (r["width"], r["height"]) == original[r["name"]]
    assert str(engine_dir.parent) not in response.text


def test_top_k_bounds_the_results(client, images):
    assert len(upload(client, images[1].read_bytes(), top_k="1").json()["results"]) == 1
    assert len(upload(client, images[1].read_bytes(), top_k="100").json()["results"]) == len(images)


def test_whole_image_bbox_equals_no_bbox_and_a_sub_box_differs(client, images):
    path = images[0]
    width, height = SIZES[0]
    plain = upload(client, path.read_bytes(), top_k="8").json()["results"]
    whole = upload(client, path.read_bytes(), top_k="8", bbox=f"0,0,{width},{height}").json()[
        "results"
    ]
    # A box larger than the image is clipped to it.
    larger = upload(
        client, path.read_bytes(), top_k="8", bbox=f"-10,-10,{width + 50},{height + 50}"
    ).json()["results"]
    part = upload(
        client, path.read_bytes(), top_k="8", bbox=f"10,10,{width - 30},{height - 20}"
    ).json()["results"]
    scores = [{r["id"]: r["score"] for r in rs} for rs in (plain, whole, larger, part)]
    for other in scores[1:3]:
        assert other == pytest.approx(scores[0], abs=1e-5)
    assert scores[3] != pytest.approx(scores[0], abs=1e-3)


def test_query_expansion_is_accepted(client, images):
    response = upload(client, images[2].read_bytes(), top_k="5", query_expansion="2")
    assert response.status_code == 200
    assert response.json()["results"][0]["name"] == images[2].name


def test_search_by_indexed_id(client, images):
    first = upload(client, images[3].read_bytes(), top_k="1").json()["results"][0]
    by_id = client.post("/search", data={"id": str(first["id"]), "top_k": "3"})
    assert by_id.status_code == 200, by_id.text
    top = by_id.json()["results"][0]
    assert (top["id"], top["name"]) == (first["id"], images[3].name)
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    width, height = SIZES[3]
    boxed = client.post("/search", data={"id": str(first["id"]), "bbox": f"0,0,{width},{height}"})
    assert boxed.json()["results"][0]["id"] == first["id"]


# ----------------------------------------------------------------- bad input


def test_not_an_image_is_415_with_the_reason(client):
    assert_refused(
        upload(client, b"hello, I am text" * 10, "notes.txt"),
        415,
        "notes.txt",
        "not a recognised image",
    )


def test_empty_upload_is_400(client):
    assert_refused(upload(client, b"", "empty.jpg"), 400, "empty.jpg", "zero bytes")


def test_truncated_jpeg_is_refused_with_the_reason(client, images):
    data = images[0].read_bytes()
    assert_refused(upload(client, data[: len(data) // 2], "cut.jpg"), 415, "cut.jpg", "truncated")


def test_too_small_image_is_422(client):
    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out, format="PNG")
    assert_refused(upload(client, out.getvalue(), "tiny.png"), 422, "tiny.png", ">= 16")


def test_too_large_upload_is_413_declared_counted_or_streamed(client):
    # Over the body limit (upload + form overhead): refused from Content-Length, unread.
    assert_refused(upload(client, b"\xff" * (4 * MAX_UPLOAD)), 413, str(MAX_UPLOAD))
    # Within the body limit but over the image limit: refused after counting the file's bytes.
    assert_refused(upload(client, b"\xff" * (MAX_UPLOAD + 1)), 413, str(MAX_UPLOAD))
    # No Content-Length (chunked): refused while streaming in.
    boundary = "selret-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'.encode()

    def chunks():
        yield head
        for _ in range(16):
            yield b"\xff" * MAX_UPLOAD
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/search",
        content=chunks(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in response.request.headers
    assert_refused(response, 413, str(MAX_UPLOAD))
    # The limit is exact: an image of exactly MAX_UPLOAD bytes is read (then refused as not an image).
    assert_refused(upload(client, b"\xff" * MAX_UPLOAD), 415)


@pytest.mark.parametrize(
    ("bbox", "words"),
    [
        ("1,2,3", ["not four"]),
        ("a,b,c,d", ["not four"]),
        ("1,2,3,4,5", ["not four"]),
        ("nan,0,50,50", ["finite"]),
        ("50,50,10,10", ["x2 > x1"]),
        ("500,500,600,600", ["outside"]),
        ("0,0,5,5", ["crop", ">= 32"]),
    ],
)
def test_bad_bbox_is_422_with_the_reason(client, images, bbox, words):
    assert_refused(upload(client, images[0].read_bytes(), top_k="2", bbox=bbox), 422, *words)


@pytest.mark.parametrize(
    ("fields", "status", "word"),
    [
        ({"top_k": "0"}, 422, "top_k"),
        ({"top_k": "101"}, 422, "top_k"),
        ({"top_k": "ten"}, 422, "top_k"),
        ({"query_expansion": "-1"}, 422, "query_expansion"),
        ({"id": "0"}, 422, "id"),
        ({"id": "1;DROP"}, 422, "id"),
        ({"id": "99999999999999999999999"}, 422, "id"),
        ({"id": "12345"}, 404, "12345"),
        ({}, 400, "exactly one"),
    ],
)
def test_bad_form_fields_are_4xx_with_the_reason(client, fields, status, word):
    assert_refused(client.post("/search", data=fields), status, word)


def test_image_and_id_together_is_400(client, images):
    assert_refused(upload(client, images[0].read_bytes(), id="1"), 400, "exactly one")


# ----------------------------------------------------------------- never a client path


def test_upload_file_name_is_never_opened(client, images, engine_dir):
    # The file name names an indexed image: were it opened, this would succeed.
    detail = assert_refused(upload(client, b"not an image at all", str(images[0])), 415)
    assert str(engine_dir.parent) not in detail and detail.startswith(images[0].name)
    detail = assert_refused(upload(client, b"still not an image", "../../etc/passwd"), 415)
    assert detail.startswith("passwd:")
    # A real image under a traversal name is searched by its bytes, as any upload.
    ok = upload(client, images[4].read_bytes(), "../../etc/passwd", top_k="1")
    assert ok.json()["results"][0]["name"] == images[4].name


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """Status and body of a GET with ``target`` sent verbatim (httpx would normalise dot segments)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "target",
    [
        "/images/../../etc/passwd",
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/%2e%2e/%2e%2e/etc/passwd",
        "/static/../server.py",
        "/static/..%2F..%2Fetc%2Fpasswd",
        "/static/server_fixtures.py",
        "/../../etc/passwd",
    ],
)
def test_path_traversal_reads_no_file(url, target):
    status, body = raw_get(url, target)
    assert 400 <= status < 500
    assert b"root:" not in body and b"import" not in body


# ----------------------------------------------------------------- thumbnails


def test_thumbnail_is_a_jpeg_of_the_image(client, images):
    first = upload(client, images[5].read_bytes(), top_k="1").json()["results"][0]
    response = client.get(first["thumbnail_url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "JPEG"
    width, height = SIZES[5]
    assert max(thumb.size) == 64  # the fixture's thumbnail_size
    assert (int(response.headers["x-image-width"]), int(response.headers["x-image-height"])) == (
        width,
        height,
    )
    big = client.get(first["thumbnail_url"], params={"size": 1024})
    assert Image.open(io.BytesIO(big.content)).size == (width, height)  # never enlarged
    again = client.get(first["thumbnail_url"])
    assert again.content == response.content  # served from the cache, identical


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/images/999", 404),
        ("/images/0", 404),
        ("/images/1;DROP", 422),
        ("/images/abc", 422),
        ("/images/-1", 422),
        ("/images/99999999999999999999999", 422),
        ("/images/1?size=5", 422),
        ("/images/1?size=99999", 422),
    ],
)
def test_thumbnail_bad_ids(client, target, status):
    assert_refused(client.get(target), status)


# ----------------------------------------------------------------- service endpoints


def test_health(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_stats_count_searches(client, images):
    before = client.get("/stats").json()
    upload(client, images[6].read_bytes(), top_k="2")
    upload(client, b"", "empty.jpg")  # refused: not counted
    after = client.get("/stats").json()
    assert after["searches"] == before["searches"] + 1
    assert after["mean_latency_ms"] > 0
    assert after["uptime_s"] >= before["uptime_s"]
    assert (after["count"], after["dim"], after["kind"]) == (len(images), 32, "exact")
    assert after["encoder_config"]["weights"] == "random" and "D=32" in after["encoder"]


def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="search-button"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert f"/static/{name}" in page.text


def test_openapi_lists_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    assert {"/search", "/images/{image_id}", "/health", "/stats"} <= set(schema["paths"])
    search = schema["paths"]["/search"]["post"]
    assert search["description"] and {"413", "415", "422", "503"} <= set(search["responses"])


def test_no_page_loads_anything_from_another_host(client):
    # The stock /docs page would fetch swagger-ui from a CDN and stay blank offline: it is off.
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    # What a browser would fetch: src/href attributes, CSS url(), fetch() and imports.
    remote = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|"""
                        r"""(?:fetch|import)\s*\(?\s*["'`](?:https?:)?//""")  # fmt: skip
    for target in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(target).text
        assert not remote.search(text), (target, remote.search(text))


def test_missing_engine_fails_at_startup(tmp_path):
    from selret.service.server import create_app, serve_in_background

    with pytest.raises(RuntimeError, match="did not start"):
        with serve_in_background(create_app(tmp_path / "nowhere"), timeout=30):
            pass
