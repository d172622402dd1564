"""The HTTP service under abuse, on a real uvicorn server with short limits: slow uploads, slow and
idle connections, a full search queue, too many connections, oversized images, API keys, CORS."""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from server_fixtures import image_paths, running_server, shared_engine

KEY = "k" * 8 + "-test-key-0123456789"
ORIGIN = "https://app.example"
BODY_TIMEOUT = 1.5
HEADER_TIMEOUT = 1.5
KEEP_ALIVE = 1


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return shared_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def url(engine_dir):
    settings = dict(
        api_key=KEY,
        cors_origins=(ORIGIN,),
        max_queue=2,
        body_timeout_s=BODY_TIMEOUT,
        header_timeout_s=HEADER_TIMEOUT,
        keep_alive_s=KEEP_ALIVE,
        query_max_pixels=1_000_000,
    )
    with running_server(engine_dir, **settings) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def query(engine_dir) -> bytes:
    return image_paths(engine_dir)[0].read_bytes()


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - start


def slow_upload_head(url: str, length: int = 100_000) -> socket.socket:
    """A POST /search whose head is complete but whose body has only begun (a slow upload)."""
    boundary = "slow"
    head = (
        f"POST /search HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    )
    sock = connect(url)
    sock.sendall(head.encode())
    return sock


# ----------------------------------------------------------------- connections and uploads


def test_a_slow_upload_is_cut_off_with_408(url):
    sock = slow_upload_head(url)
    with sock:
        start = time.monotonic()
        sent_until = start + 10 * BODY_TIMEOUT
        sock.settimeout(0.3)
        answer = b""
        while time.monotonic() < sent_until:  # one byte every 0.3 s: a slow-loris body
            try:
                sock.sendall(b"x")
                answer += sock.recv(65536)
                if answer:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"not received within 1.5 s" in answer
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 3


def test_a_slow_request_head_is_dropped(url):
    with connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        closed_after = None
        sock.settimeout(0.3)
        while time.monotonic() - start < 10 * HEADER_TIMEOUT:
            try:
                sock.sendall(b"X")  # a header that never ends
                if sock.recv(65536) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None and closed_after < HEADER_TIMEOUT + 3


def test_idle_connections_are_closed(url):
    # Connected, never asked anything: closed at the head deadline.
    with connect(url) as sock:
        data, seconds = read_until_closed(sock, 10 * HEADER_TIMEOUT)
    assert data == b"" and seconds < HEADER_TIMEOUT + 3
    # Asked once, then idle on a keep-alive connection: closed after keep_alive_s.
    with connect(url) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n\r\n".encode())
        data, seconds = read_until_closed(sock, 10 * HEADER_TIMEOUT)
    assert data.startswith(b"HTTP/1.1 200") and b'{"status":"ok"}' in data
    assert seconds < KEEP_ALIVE + 3


def test_a_full_queue_answers_503_with_retry_after_and_recovers(client, url, query):
    # Two slow uploads hold both search slots (admission comes before the body is read).
    held = [slow_upload_head(url), slow_upload_head(url)]
    try:
        time.sleep(0.3)
        busy = client.post("/search", files={"image": ("q.jpg", query, "image/jpeg")})
        assert busy.status_code == 503, busy.text
        assert "busy" in busy.json()["detail"] and "limit is 2" in busy.json()["detail"]
        assert 1 <= int(busy.headers["retry-after"]) <= 60
        assert client.get("/stats").json()["refused_busy"] >= 1
    finally:
        for sock in held:
            sock.close()
    # The held slots come back (the uploads end); searches are served again.
    deadline = time.monotonic() + 10 * BODY_TIMEOUT
    while True:
        response = client.post("/search", files={"image": ("q.jpg", query, "image/jpeg")})
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert response.status_code == 200, response.text


def test_too_many_connections_get_503_until_they_go(engine_dir):
    with running_server(engine_dir, max_connections=3, header_timeout_s=HEADER_TIMEOUT) as base:
        idle = [connect(base) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert httpx.get(f"{base}/health", timeout=30).status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200


# ----------------------------------------------------------------- pixels


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds almost no pixel data: decoding it
    fails (415), so a 413 proves the pixel cap was checked from the header, before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))  # fmt: skip


def test_the_query_pixel_cap_is_checked_from_the_header(client):
    start = time.perf_counter()
    big = client.post("/search", files={"image": ("big.png", png_header_only(8000, 8000))})
    assert time.perf_counter() - start < 5
    assert big.status_code == 413, big.text
    assert big.json()["detail"] == (
        "big.png: 8000 x 8000 = 64000000 pixels exceeds the limit of 1000000"
    )
    # Under the cap, the same lie is found at decoding.
    small = client.post("/search", files={"image": ("small.png", png_header_only(900, 900))})
    assert small.status_code == 415, small.text


def test_an_oversized_png_is_refused_without_decoding_a_pixel(client, monkeypatch):
    # A real PNG (compressed, with all its pixel data) over the 1 MP cap. The server runs in this
    # process, so a decode anywhere in the request would go through ImageFile.load.
    from PIL import ImageFile

    out = io.BytesIO()
    Image.new("1", (2000, 2000), 1).save(out, format="PNG")
    loads = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    response = client.post("/search", files={"image": ("solid.png", out.getvalue())})
    assert response.status_code == 413, response.text
    assert loads == []


def test_a_large_jpeg_is_decoded_in_draft_under_the_cap(client):
    # 1600 x 1200 = 1.92 MP declared, over the 1 MP cap; draft decoding at 1/2 gives 0.48 MP,
    # still more than the 128-px network input needs: accepted.
    out = io.BytesIO()
    Image.effect_noise((1600, 1200), 60).convert("RGB").save(out, format="JPEG", quality=80)
    response = client.post("/search", files={"image": ("photo.jpg", out.getvalue())})
    assert response.status_code == 200, response.text
    png = io.BytesIO()
    Image.effect_noise((1600, 1200), 60).convert("RGB").save(png, format="PNG")
    refused = client.post("/search", files={"image": ("photo.png", png.getvalue())})
    assert refused.status_code == 413 and "exceeds the limit" in refused.json()["detail"]


# ----------------------------------------------------------------- API key and CORS


@pytest.mark.parametrize("target", ["/stats", "/images/1"])
def test_the_key_is_required_but_not_for_health_and_the_page(url, target):
    assert httpx.get(f"{url}/health").status_code == 200
    for open_path in ("/", "/static/app.js", "/openapi.json"):
        assert httpx.get(f"{url}{open_path}").status_code == 200, open_path
    missing = httpx.get(f"{url}{target}")
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.get(f"{url}{target}", headers={"X-API-Key": KEY[:-1] + "x"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong API key"
    assert httpx.get(f"{url}{target}", headers={"X-API-Key": KEY}).status_code == 200
    bearer = httpx.get(f"{url}{target}", headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200


def test_search_without_the_key_is_refused_before_the_upload_is_read(url, query):
    response = httpx.post(f"{url}/search", files={"image": ("q.jpg", query)})
    assert response.status_code == 401
    ok = httpx.post(f"{url}/search", files={"image": ("q.jpg", query)},
                    headers={"Authorization": f"bearer {KEY}"})  # fmt: skip
    assert ok.status_code == 200 and ok.json()["results"]


def test_cors_allows_the_configured_origin_only(url):
    allowed = httpx.get(f"{url}/health", headers={"Origin": ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{url}/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # A browser's preflight carries no key; it is answered without one.
    preflight = httpx.options(
        f"{url}/search",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key"},
    )  # fmt: skip
    assert preflight.status_code == 200
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()


def test_by_default_no_key_and_no_cors(engine_dir):
    with running_server(engine_dir) as base:
        response = httpx.get(f"{base}/stats", headers={"Origin": ORIGIN})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
        assert response.json()["limits"]["query_max_pixels"] == 16_000_000


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path):
    from selret.service.config import key_file_is_shared, read_api_key

    assert read_api_key(None, environ={}) is None
    assert read_api_key(None, environ={"SELRET_API_KEY": f" {KEY}\n"}) == KEY
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    key_file.chmod(0o600)
    assert read_api_key(key_file, environ={"SELRET_API_KEY": "other" * 4}) == KEY
    assert not key_file_is_shared(key_file)
    key_file.chmod(0o644)
    assert key_file_is_shared(key_file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        read_api_key(tmp_path / "missing")
