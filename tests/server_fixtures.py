"""Helpers shared by test_server.py and test_browser.py: a small random-weights search engine built
once per test session from generated images, and a real uvicorn server over it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import cv2
import httpx
import numpy as np

N_IMAGES = 8
MAX_SIDE = 128
# Distinct sizes and aspect ratios (width, height), so that sizes in responses can be told apart.
SIZES = [
    (160, 120),
    (120, 160),
    (200, 140),
    (144, 144),
    (180, 100),
    (110, 170),
    (190, 150),
    (150, 190),
]

_engines: dict[str, Path] = {}


def make_image(seed: int, width: int, height: int) -> np.ndarray:
    """A distinctive RGB picture: a coloured noise texture with random filled shapes on it."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 40, (height // 8 + 1, width // 8 + 1, 3))
    texture = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    img = np.clip(base + texture, 0, 255).astype(np.uint8)
    for _ in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(8, max(9, min(width, height) // 2)))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), size, colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + size, y + int(rng.integers(8, 40))), colour, -1)
    return img


def write_images(folder: Path) -> list[Path]:
    """``N_IMAGES`` generated JPEGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(SIZES[:N_IMAGES]):
        path = folder / f"img{i:02d}.jpg"
        cv2.imwrite(
            str(path),
            cv2.cvtColor(make_image(100 + i, w, h), cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, 92],
        )
        paths.append(path)
    return paths


def build_engine(root: Path) -> Path:
    """A random-weights engine under ``root/engine`` indexing the images of ``root/images``."""
    from selret.encoding.encoder import Encoder, EncoderConfig
    from selret.features.extractor import Extractor
    from selret.search.engine import SearchEngine

    paths = write_images(root / "images")
    cache = root / "cache"
    config = EncoderConfig(weights="random", max_side=MAX_SIDE, d=16, k=10, kmeans_iters=5)
    encoder = Encoder(config).fit(
        Extractor.for_config(config, cache=cache).maps(paths, progress=False)
    )
    engine = SearchEngine.create(root / "engine", encoder, cache_dir=cache)
    report = engine.add_images(paths, progress=False)
    assert report.added == len(paths), report.failed
    return root / "engine"


def shared_engine(tmp_path_factory) -> Path:
    """The session's engine directory, built on first use (both test modules share it)."""
    if "engine" not in _engines:
        _engines["engine"] = build_engine(tmp_path_factory.mktemp("server-engine"))
    return _engines["engine"]


def image_paths(engine_dir: Path) -> list[Path]:
    """The indexed images of an engine made by ``build_engine``."""
    return sorted((engine_dir.parent / "images").glob("*.jpg"))


@contextmanager
def running_server(engine_dir: Path, **app_options):
    """A real uvicorn server on a free loopback port; yields its base URL once /health answers."""
    from selret.service.server import create_app, serve_in_background

    with serve_in_background(create_app(engine_dir, **app_options)) as url:
        response = httpx.get(f"{url}/health", timeout=30)
        assert response.json() == {"status": "ok"}
        yield url
