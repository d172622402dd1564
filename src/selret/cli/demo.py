"""``selret demo``: the whole product on the embedded photo set, end to end, offline."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import typer

from selret.cli._app import app

DEFAULT_WORKDIR = Path("~/.cache/selret/demo")


@app.command()
def demo(
    workdir: Path = typer.Option(
        DEFAULT_WORKDIR, help="Where the demo writes its images, cache and index."
    ),
    preset: str = typer.Option("temb-demo-512", help="Encoder preset."),
    mask: str = typer.Option("max", help="Selection mask: sift, sum, max or none."),
    max_side: int = typer.Option(
        512,
        "--max-side",
        help="Longest image side (the demo photos are at most ~1000 px; the paper uses 1024).",
    ),
    weights: str = typer.Option("vgg16-caffe", help="Backbone weights."),
    top: int = typer.Option(5, "--top", "-k", help="Results shown per query."),
    show: int = typer.Option(4, help="Queries whose ranked results are printed."),
) -> None:
    """Build an encoder and an index on bundled real photos, run the queries, print results and mAP."""
    import numpy as np

    from selret.encoding.encoder import Encoder, EncoderConfig, SmallLearningSetWarning
    from selret.evaluation.demo_data import build_demo_dataset, learning_images
    from selret.evaluation.metrics import compute_map
    from selret.features.extractor import feature_maps_for
    from selret.search.engine import SearchEngine

    workdir = workdir.expanduser()
    cache = workdir / "features"
    t0 = time.perf_counter()
    bench = build_demo_dataset(workdir / "data")
    learn = learning_images(workdir / "data")
    typer.echo(
        f"data: {bench.summary()}; learning set: {len(learn)} other bundled images -> {workdir / 'data'}"
    )

    config = EncoderConfig.from_preset(preset, mask=mask, max_side=max_side, weights=weights)
    learn_maps = feature_maps_for(learn, config, cache, progress=True)
    with warnings.catch_warnings():
        # 14 learning images < 640 rotation dimensions: expected here, said once below.
        warnings.simplefilter("ignore", SmallLearningSetWarning)
        encoder = Encoder(config).fit(learn_maps)
    typer.echo(
        f"encoder: {encoder!r}; mask kept {100 * encoder.kept_fraction_:.0f}% of local features on the learning set"
    )

    engine_dir = workdir / "index"
    shutil.rmtree(
        engine_dir, ignore_errors=True
    )  # the demo rebuilds its index; features stay cached
    engine = SearchEngine.create(engine_dir, encoder, cache_dir=cache)
    db_paths = [bench.image_path(i) for i in range(len(bench.db_images))]
    report = engine.add_images(db_paths)
    typer.echo(
        f"index: {len(engine.index)} images in {engine_dir} ({report.added} added, {len(report.failed)} failed)"
    )

    # Queries: encode with the same encoder (cached maps), rank the whole database.
    q_paths = [bench.query_path(q) for q in bench.queries]
    q_maps = engine.extractor().maps(q_paths, progress=False)
    q_vecs = encoder.encode_many(q_maps)
    position = {str(p): i for i, p in enumerate(db_paths)}
    hits = engine.index.search(q_vecs, len(engine.index))
    ranks = np.array([[position[h.path] for h in row] for row in hits]).T  # (n_db, n_queries)
    result = compute_map(ranks, bench.gnd())

    # A few synthetic-variant queries, and always the real second photograph of the motorcycle.
    shown = [i for i, q in enumerate(bench.queries) if q.name == "motorcycle_right"]
    shown = [i for i in range(len(bench.queries)) if i not in shown][
        : max(show - len(shown), 0)
    ] + shown
    for qi in shown:
        query = bench.queries[qi]
        typer.echo(f"\nquery {query.name}  (AP {100 * result.aps[qi]:.1f})")
        for r, h in enumerate(hits[qi][:top], 1):
            mark = "+" if position[h.path] in query.positives else "-"
            typer.echo(f"  {r}. {mark} {h.score:.3f}  {Path(h.path).name}")
    typer.echo(
        f"\nmAP over {len(bench.queries)} queries: {100 * result.map:.1f}  "
        f"(P@1 {100 * result.mpr[0]:.1f})  total {time.perf_counter() - t0:.0f}s"
    )
    typer.echo(
        f"next: selret search {q_paths[0]} --index {engine_dir}   |   selret serve {engine_dir}"
    )
