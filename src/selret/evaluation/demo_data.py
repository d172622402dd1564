"""The embedded default data set: real photographs shipped inside installed packages, plus generated
near-duplicate variants, written as an image folder with ground truth.

Nothing is downloaded: the photographs are the files bundled in scikit-image's ``skimage/data``
folder and scikit-learn's sample images. Ten photos are the *objects* (each indexed with three
variants besides itself, and queried with an unseen, harder variant); the motorcycle also gets the
real right view of scikit-image's stereo pair as a query. Other bundled images (textures, microscopy,
documents) form the *learning set*, disjoint from the indexed and query images as the paper's
held-out protocol asks.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

OBJECTS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "hubble_deep_field",
    "camera",
    "coins",
    "china",
    "flower",
)
LEARNING = (
    "brick",
    "grass",
    "gravel",
    "retina",
    "moon",
    "page",
    "text",
    "ihc",
    "cell",
    "clock_motion",
    "color",
    "logo",
    "chessboard_RGB",
    "microaneurysms",
)
# Database variants of each object, and the query variant (never in the database).
DB_VARIANTS = ("original", "crop", "rotate", "jpeg_small")
QUERY_VARIANT = "perspective_colour"


def _skimage_file(name: str) -> Path:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    for ext in (".png", ".jpg"):
        if (folder / f"{name}{ext}").is_file():
            return folder / f"{name}{ext}"
    raise FileNotFoundError(f"scikit-image does not bundle an image named {name!r} in {folder}")


def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as H x W x 3 uint8 RGB (greyscale and RGBA converted)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        rgb = load_sample_image(f"{name}.jpg")
    else:
        from selret.features.io import load_image

        rgb = load_image(_skimage_file(name))
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def make_variant(rgb: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A near-duplicate of ``rgb``: crop, rotation, JPEG at low size/quality, or perspective+colour."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    if kind == "original":
        return rgb
    if kind == "crop":
        y0, x0 = int(0.1 * h), int(0.15 * w)
        return np.ascontiguousarray(rgb[y0 : y0 + int(0.75 * h), x0 : x0 + int(0.75 * w)])
    if kind == "rotate":
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 12.0, 1.1)
        return cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    if kind == "jpeg_small":
        small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 25]
        )
        assert ok
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if kind == "perspective_colour":
        jitter = rng.uniform(0.04, 0.1, size=(4, 2)) * [w, h]
        src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
        dst = np.float32(src + jitter * [[1, 1], [-1, 1], [-1, -1], [1, -1]])
        warped = cv2.warpPerspective(
            rgb, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT
        )
        hsv = cv2.cvtColor(warped, cv2.COLOR_RGB2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + 8) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * 0.8, 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] * 1.1 + 10, 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    raise ValueError(f"unknown variant {kind!r}")


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(
        str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]
    ):
        raise OSError(f"{path}: could not write image")


def build_demo_dataset(root: str | Path):
    """Write the demo set under ``root`` (idempotent) and return it as a ``RetrievalBenchmark``.

    Layout: ``database/<object>__<variant>.jpg``, ``queries/<object>__<variant>.jpg``,
    ``learning/<name>.jpg``, ``learning.txt`` (the learning-set list) and ``ground_truth.json``
    (selret's benchmark format, readable by ``selret eval``).
    """
    from selret.evaluation.datasets import Query, RetrievalBenchmark, read_benchmark_json, write_gnd

    root = Path(root).resolve()
    gnd_path = root / "ground_truth.json"
    if gnd_path.is_file() and (root / "learning.txt").is_file():
        return read_benchmark_json(gnd_path, root=root)
    db_images: list[str] = []
    queries: list[Query] = []
    for obj_idx, name in enumerate(OBJECTS):
        photo = load_photo(name)
        first = len(db_images)
        for variant in DB_VARIANTS:
            rel = f"database/{name}__{variant}.jpg"
            _write(root / rel, make_variant(photo, variant, seed=obj_idx))
            db_images.append(rel)
        positives = list(range(first, len(db_images)))
        rel = f"queries/{name}__{QUERY_VARIANT}.jpg"
        _write(root / rel, make_variant(photo, QUERY_VARIANT, seed=obj_idx))
        queries.append(
            Query(name=f"{name}__{QUERY_VARIANT}", image=rel, positives=positives, category=name)
        )
        if name == "motorcycle_left":
            # The real other view of the stereo pair: a genuine second photograph of the scene.
            rel = "queries/motorcycle_right.jpg"
            _write(root / rel, load_photo("motorcycle_right"))
            queries.append(
                Query(name="motorcycle_right", image=rel, positives=positives, category=name)
            )
    for name in LEARNING:
        _write(root / f"learning/{name}.jpg", load_photo(name))
    (root / "learning.txt").write_text("".join(f"learning/{n}.jpg\n" for n in LEARNING))
    bench = RetrievalBenchmark("selret-demo", root, db_images, queries, protocol="standard")
    write_gnd(bench, gnd_path)
    return bench


def learning_images(root: str | Path) -> list[Path]:
    """The demo's learning set (disjoint from its database and queries)."""
    root = Path(root).resolve()
    return [root / line for line in (root / "learning.txt").read_text().split()]
