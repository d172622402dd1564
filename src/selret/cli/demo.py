"""``selret demo``: the whole product on the embedded photo set, end to end, offline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer

from selret.cli._app import app
from selret.cli.encoder import ENCODER_HELP, load_encoder

DEFAULT_WORKDIR = Path("~/.cache/selret/demo")


@app.command()
def demo(
    workdir: Path = typer.Option(
        DEFAULT_WORKDIR, help="Where the demo writes its images, cache and index."
    ),
    encoder_name: str | None = typer.Option(None, "--encoder", "-e", help=ENCODER_HELP),
    top: int = typer.Option(5, "--top", "-k", help="Results shown per query."),
    show: int = typer.Option(4, help="Queries whose ranked results are printed."),
) -> None:
    """Index the bundled real photos with a pre-trained encoder (nothing is fitted), run the
    queries, print results and mAP."""
    import numpy as np

    from selret.evaluation.demo_data import build_demo_dataset
    from selret.evaluation.metrics import compute_map
    from selret.search.engine import SearchEngine

    workdir = workdir.expanduser()
    cache = workdir / "features"
    t0 = time.perf_counter()
    bench = build_demo_dataset(workdir / "data")
    typer.echo(f"data: {bench.summary()} -> {workdir / 'data'}")
    encoder = load_encoder(encoder_name)
    typer.echo(f"encoder: {encoder!r}")

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
