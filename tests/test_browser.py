"""The web page in headless Chromium (Playwright): upload, box drawing, search, re-query by result."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from server_fixtures import SIZES, image_paths, running_server, shared_engine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} not installed"),
]
sync_api = pytest.importorskip("playwright.sync_api")

TIMEOUT_MS = 120_000  # a search encodes on a shared CPU


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return shared_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def url(engine_dir):
    with running_server(engine_dir) as base:
        yield base


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        yield page
        browser.close()
        assert not errors, errors


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag from ``start`` to ``end`` (page pixels), in steps as a hand would."""
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


def box_numbers(page) -> list[int]:
    return [int(v) for v in page.locator("#bbox-text").inner_text().split(",")]


def search_and_wait(page, first_name: str | None = None):
    """Click Search; wait until the status line reports the new results."""
    page.locator("#status").evaluate("el => el.textContent = ''")
    page.click("#search-button")
    page.wait_for_function("document.querySelector('#status').textContent.includes('results for')")
    results = page.locator("#results .result")
    assert results.count() > 0
    if first_name is not None:
        assert results.first.locator(".name").inner_text() == first_name
    return results


def test_search_box_and_requery_in_the_page(page, engine_dir):
    images = image_paths(engine_dir)
    query, (width, height) = images[0], SIZES[0]
    assert page.locator("#index-info").inner_text().startswith(f"{len(images)} images indexed")

    page.set_input_files("#file-input", str(query))
    preview = page.locator("#preview-image")
    page.wait_for_function("document.querySelector('#preview-image').naturalWidth > 0")
    rect = preview.bounding_box()

    # A drag from the image's corner to past its opposite corner selects the whole image, in
    # original-image pixels: the same query as no box, so the image finds itself first.
    # (0.3 px inside: the very edge pixel belongs to the element around the image.)
    drag(
        page,
        (rect["x"] + 0.3, rect["y"] + 0.3),
        (rect["x"] + rect["width"] + 40, rect["y"] + rect["height"] + 40),
    )
    assert box_numbers(page) == [0, 0, width, height]
    results = search_and_wait(page, first_name=query.name)
    assert f"in box 0, 0, {width}, {height}" in page.locator("#status").inner_text()
    scores = results.locator(".score").all_inner_texts()
    assert len(scores) == 10 or len(scores) == len(images)
    assert all(re.fullmatch(r"-?\d\.\d{3}", s) for s in scores), scores
    assert float(scores[0]) == pytest.approx(1.0, abs=1e-3)
    assert results.first.locator(".rank").inner_text() == "#1"

    # Clear the box; a click without a drag draws none either.
    page.click("#clear-box")
    assert page.locator("#bbox-text").inner_text() == "whole image"

    # Clicking a result queries with that indexed image.
    second = results.nth(1)
    second_name = second.locator(".name").inner_text()
    second.locator("button").click()
    page.wait_for_function(
        "name => document.querySelector('#query-name').textContent.startsWith(name)",
        arg=second_name,
    )
    page.wait_for_function(
        "name => document.querySelector('#status').textContent.includes('results for ' + name)",
        arg=second_name,
    )
    assert page.locator("#results .result").first.locator(".name").inner_text() == second_name
    assert "indexed image #" in page.locator("#query-name").inner_text()

    # A box on the indexed image's preview is in that image's original pixels.
    clicked = next(p for p in images if p.name == second_name)
    full_w, full_h = SIZES[images.index(clicked)]
    page.wait_for_function("document.querySelector('#preview-image').naturalWidth > 0")
    rect = preview.bounding_box()
    drag(
        page,
        (rect["x"] + 0.2 * rect["width"], rect["y"] + 0.2 * rect["height"]),
        (rect["x"] + 0.8 * rect["width"], rect["y"] + 0.8 * rect["height"]),
    )
    x1, y1, x2, y2 = box_numbers(page)
    for got, want in (
        (x1, 0.2 * full_w),
        (y1, 0.2 * full_h),
        (x2, 0.8 * full_w),
        (y2, 0.8 * full_h),
    ):
        assert abs(got - want) <= 2, (box_numbers(page), full_w, full_h)
    search_and_wait(page)
    assert f"in box {x1}, {y1}, {x2}, {y2}" in page.locator("#status").inner_text()
    assert page.locator("#error").is_hidden()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-search.png"), full_page=True)


def test_api_errors_are_shown_in_the_page(page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_function(
        "document.querySelector('#error').textContent.includes('cannot display')"
    )
    page.click("#search-button")
    error = page.locator("#error")
    error.wait_for(state="visible")
    page.wait_for_function(
        "document.querySelector('#error').textContent.includes('not a recognised image')"
    )
    assert "notes.jpg" in error.inner_text()
