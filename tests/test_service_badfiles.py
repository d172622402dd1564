"""The bad-file corpus (tests/badfiles.py) through every HTTP endpoint: never a 500, always the
documented status with a reason.

- POST /search with each corpus file uploaded;
- GET /images/{id} and POST /search by id, for an indexed file that was later replaced by each
  corpus entry (a symbolic link to it takes the indexed file's place: one way to turn the indexed
  path into any kind of entry, FIFOs, folders and broken links included).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from badfiles import make_corpus
from server_fixtures import image_paths, running_server, shared_engine

from selret.features.io import image_size
from selret.service.config import DEFAULT_QUERY_MAX_PIXELS

# The documented status of each refusal of an upload (see the POST /search description).
UPLOAD_STATUS = {
    "EmptyImageError": 400,
    "CorruptImageError": 415,
    "ImageTooLargeError": 413,
    "ImageTooSmallError": 422,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def replaced(tmp_path_factory, corpus):
    """An engine indexing one copy of a good image per corpus entry, each copy then replaced by a
    link to its entry. Returns (engine dir, {kind: catalog id})."""
    from selret.encoding.encoder import Encoder
    from selret.search.engine import SearchEngine

    shared = shared_engine(tmp_path_factory)
    root = tmp_path_factory.mktemp("replaced")
    original = image_paths(shared)[0]
    copies = []
    for entry in corpus:
        copy = root / "images" / f"{entry.kind}.jpg"
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(original, copy)
        copies.append(copy)
    # Same content: one extraction, read from the cache for every other copy.
    engine = SearchEngine.create(
        root / "engine", Encoder.load(shared / "encoder.npz"), cache_dir=shared.parent / "cache"
    )
    report = engine.add_images(copies, progress=False)
    assert report.added == len(corpus), report.failed
    ids = {}
    for entry, copy in zip(corpus, copies, strict=True):
        ids[entry.kind] = engine.index.get(str(copy.resolve())).id
        copy.unlink()
        os.symlink(entry.path, copy)
    return root / "engine", ids


@pytest.fixture(scope="module")
def url(replaced):
    with running_server(replaced[0]) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def declared_pixels(data: bytes) -> int:
    try:
        height, width = image_size(data)
    except Exception:  # not even a readable header
        return 0
    return height * width


def assert_reasoned(response, status: int, label: str) -> None:
    assert response.status_code == status, (label, response.status_code, response.text)
    if status != 200:
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail.startswith(label), (label, detail)
        assert "Traceback" not in response.text


def test_every_upload_gets_its_documented_status(client, corpus):
    tried = 0
    for entry in corpus:
        data = entry.data()
        if data is None:  # a FIFO, a folder, a link to nothing: nothing to upload
            continue
        label = Path(entry.name).name
        response = client.post("/search", files={"image": (label, data)}, data={"top_k": "3"})
        if entry.good:
            expected = 200
        elif declared_pixels(data) > DEFAULT_QUERY_MAX_PIXELS:
            expected = 413  # the query cap is below the indexing cap the corpus is made for
        else:
            expected = UPLOAD_STATUS[entry.expect]
        assert_reasoned(response, expected, label)
        if entry.good:
            assert len(response.json()["results"]) == 3
        tried += 1
    assert tried >= 40


def test_thumbnails_of_replaced_indexed_files(client, corpus, replaced):
    _, ids = replaced
    for entry in corpus:
        image_id = ids[entry.kind]
        response = client.get(f"/images/{image_id}")
        label = f"indexed image {image_id} ({entry.kind}.jpg)"
        if entry.good:
            assert_reasoned(response, 200, label)
            assert response.headers["content-type"] == "image/jpeg"
        else:
            gone = entry.expect == "ImageNotFoundError"
            assert_reasoned(response, 404 if gone else 409, label)
            assert ("the file is gone" if gone else "the file changed on disk") in response.text


def test_search_by_id_of_replaced_indexed_files(client, corpus, replaced):
    _, ids = replaced
    for entry in corpus:
        image_id = ids[entry.kind]
        response = client.post("/search", data={"id": str(image_id), "top_k": "2"})
        label = f"indexed image {image_id} ({entry.kind}.jpg)"
        if entry.good:
            assert_reasoned(response, 200, label)
        else:
            assert_reasoned(response, 404 if entry.expect == "ImageNotFoundError" else 409, label)
            assert "re-index" in response.json()["hint"]


def test_the_server_is_still_well_after_the_fuzz(client, corpus):
    assert client.get("/health").json() == {"status": "ok"}
    stats = client.get("/stats").json()
    assert stats["in_progress"] == 0
    assert stats["searches"] >= sum(e.good for e in corpus)
