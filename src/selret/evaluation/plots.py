"""Figures of evaluation runs and experiments (matplotlib, no display needed).

* :func:`contact_sheet` - for a few queries, the query thumbnail then its top-k results, each with
  a green (positive), red (negative) or grey (junk) border.
* :func:`plot_experiment` - the figure of an :class:`selret.evaluation.experiments.ExperimentResult`: grouped
  bars, mAP-against-parameter curves, or correlation histograms, depending on the experiment.

Figures are built on ``matplotlib.figure.Figure`` directly (not pyplot), so nothing global changes
and no GUI backend is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from selret.files import atomic_write

POSITIVE = (0, 170, 0)
NEGATIVE = (220, 30, 30)
JUNK = (150, 150, 150)
QUERY = (30, 80, 220)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


# --------------------------------------------------------------------------- contact sheet


def thumbnail(path: str | Path, size: int = 160, bbox=None, rotation: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 thumbnail of an image file (cropped by ``bbox``), longest side ``size``."""
    from PIL import Image

    from selret.features.io import load_image, rotate

    rgb = rotate(load_image(path), rotation)
    if bbox is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in bbox)
        h, w = rgb.shape[:2]
        crop = rgb[max(0, y1) : min(h, y2), max(0, x1) : min(w, x2)]
        rgb = crop if crop.size else rgb
    img = Image.fromarray(rgb)
    img.thumbnail((size, size))
    return np.asarray(img)


def with_border(rgb: np.ndarray, colour: Sequence[int], width: int = 6) -> np.ndarray:
    """``rgb`` framed by a ``width``-pixel border of ``colour``."""
    h, w = rgb.shape[:2]
    out = np.empty((h + 2 * width, w + 2 * width, 3), np.uint8)
    out[:] = np.asarray(colour, np.uint8)
    out[width : width + h, width : width + w] = rgb[..., :3]
    return out


def pick_queries(n_queries: int, n: int) -> list[int]:
    """``n`` query indices spread evenly over ``0..n_queries - 1`` (every query if fewer)."""
    if n_queries <= n:
        return list(range(n_queries))
    return sorted({int(round(i)) for i in np.linspace(0, n_queries - 1, n)})


def contact_sheet(
    benchmark,
    ranks: np.ndarray,
    path: str | Path,
    queries: Sequence[int] | None = None,
    n_queries: int = 4,
    k: int = 6,
    size: int = 128,
    aps: Sequence[float] | None = None,
) -> Path:
    """Save a PNG grid: one row per query (query thumbnail, then its top-``k`` results).

    ``ranks`` is (n_db, n_q) as from :func:`selret.evaluation.metrics.rank_by_inner_product`; ``queries``
    the query indices to show (default: ``n_queries`` spread over the list). Result borders:
    green positive, red negative, grey junk; the query's border is blue. ``aps`` (per query)
    are printed in the row title when given.
    """
    queries = pick_queries(len(benchmark.queries), n_queries) if queries is None else list(queries)
    k = min(k, ranks.shape[0])
    fig = _figure(1.6 * (k + 1), 1.9 * max(len(queries), 1))
    axes = np.atleast_2d(fig.subplots(max(len(queries), 1), k + 1, squeeze=False))
    gnd = benchmark.gnd()  # positives and junk under the benchmark's protocol
    for row, qi in enumerate(queries):
        q = benchmark.queries[qi]
        positives, junk = set(gnd[qi]["ok"]), set(gnd[qi]["junk"])
        qimg = thumbnail(benchmark.query_path(q), size, q.bbox, benchmark.rotation(q.image))
        title = q.name if aps is None or aps[qi] is None else f"{q.name}\nAP {100 * aps[qi]:.1f}"
        _show(axes[row, 0], with_border(qimg, QUERY), title)
        for j in range(k):
            idx = int(ranks[j, qi])
            colour = POSITIVE if idx in positives else JUNK if idx in junk else NEGATIVE
            img = thumbnail(
                benchmark.image_path(idx), size, None, benchmark.rotation(benchmark.db_images[idx])
            )
            _show(
                axes[row, j + 1],
                with_border(img, colour),
                f"{j + 1}. {Path(benchmark.db_images[idx]).stem}",
            )
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically (a crash never leaves half an image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return path


def _show(ax, img: np.ndarray, title: str) -> None:
    ax.imshow(img, interpolation="nearest")  # keeps the border colours exact
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


# --------------------------------------------------------------------------- experiments


def _pct(v) -> float:
    return float("nan") if v is None else 100.0 * float(v)


def _grouped_bars(ax, rows, group_key: str, series_key: str, value: str = "mAP") -> None:
    groups = list(dict.fromkeys(str(r[group_key]) for r in rows))
    series = list(dict.fromkeys(str(r[series_key]) for r in rows))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, s in enumerate(series):
        vals = [
            next(
                (
                    _pct(r[value])
                    for r in rows
                    if str(r[group_key]) == g and str(r[series_key]) == s
                ),
                np.nan,
            )
            for g in groups
        ]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=s)
    ax.set_xticks(x, groups, rotation=20 if len(groups) > 4 else 0, fontsize=8)
    ax.set_ylabel(f"{value} (%)")
    ax.legend(title=series_key, fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _curves(
    ax, rows, x_key: str, series_key: str, value: str = "mAP", categorical: bool = False
) -> None:
    xs_all = list(dict.fromkeys(r[x_key] for r in rows))
    for s in dict.fromkeys(r[series_key] for r in rows):
        pts = [(r[x_key], _pct(r[value])) for r in rows if r[series_key] == s]
        xs = [xs_all.index(p[0]) for p in pts] if categorical else [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", label=f"{series_key} {s}")
    if categorical:
        ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all], fontsize=8)
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{value} (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_dims(fig, result) -> None:
    ax = fig.subplots()
    _curves(ax, result.rows, "D", "mask")
    ax.set_xscale("log", base=2)
    ds = sorted({r["D"] for r in result.rows})
    ax.set_xticks(ds, [str(d) for d in ds])


def _plot_masks(fig, result) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    bins = np.asarray(result.extra["bins"])
    centres = (bins[:-1] + bins[1:]) / 2
    for mask, hist in result.extra["histograms"].items():
        ax1.plot(centres, hist, label=mask)
    # Zoom on the occupied range: post-ReLU features are never negatively correlated.
    occupied = np.flatnonzero(np.sum(list(result.extra["histograms"].values()), axis=0) > 0)
    if occupied.size:
        ax1.set_xlim(bins[occupied[0]] - 0.05, bins[occupied[-1] + 1] + 0.05)
    ax1.set_xlabel("cosine similarity of two kept local features of one image")
    ax1.set_ylabel("fraction of pairs")
    ax1.legend(title="mask", fontsize=7)
    ax1.grid(alpha=0.3)
    names = [r["mask"] for r in result.rows]
    ax2.bar(names, [_pct(r["kept %"]) for r in result.rows], yerr=[_pct(r["kept sd"]) for r in result.rows],
            color="tab:gray", label="features kept (%)")  # fmt: skip
    if any(r.get("mAP") is not None for r in result.rows):
        ax2.plot(
            names, [_pct(r.get("mAP")) for r in result.rows], "o-", color="tab:red", label="mAP (%)"
        )
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("%")
    ax2.legend(fontsize=7)
    ax2.grid(axis="y", alpha=0.3)


def _plot_baselines(fig, result) -> None:
    ax = fig.subplots()
    rows = result.rows
    labels = [f"{r['method']} ({r['D']}-D)" for r in rows]
    colours = ["tab:gray" if r["mask"] == "-" else "tab:blue" for r in rows]
    y = np.arange(len(rows))
    bars = ax.barh(y, [_pct(r["mAP"]) for r in rows], color=colours)
    ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mAP (%)")
    ax.grid(axis="x", alpha=0.3)


def plot_experiment(result, path: str | Path) -> Path:
    """Save the figure of an experiment result as a PNG at ``path``."""
    tall = result.name == "baselines"
    fig = _figure(
        10 if result.name == "masks" else 7, max(4.0, 0.35 * len(result.rows)) if tall else 4.5
    )
    name = result.name
    if name == "frameworks":
        _grouped_bars(fig.subplots(), result.rows, "framework", "mask")
    elif name == "dims":
        _plot_dims(fig, result)
    elif name == "image-size":
        _grouped_bars(fig.subplots(), result.rows, "mask", "size")
    elif name == "layers":
        _curves(fig.subplots(), result.rows, "layer", "mask", categorical=True)
    elif name == "alpha":
        _curves(fig.subplots(), result.rows, "alpha", "mask")
    elif name == "masks":
        _plot_masks(fig, result)
    elif name == "baselines":
        _plot_baselines(fig, result)
    else:
        raise ValueError(f"no figure for experiment {name!r}")
    s = result.setup
    fig.suptitle(
        f"{result.title}\n{s['dataset']} ({s['protocol']}), learning set {s['learning_set']['name']}",
        fontsize=9,
    )
    return _save(fig, path)


__all__ = ["contact_sheet", "pick_queries", "plot_experiment", "thumbnail", "with_border"]
