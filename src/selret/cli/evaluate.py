"""``selret eval`` (one method on one benchmark) and ``selret experiment NAME`` (the paper's grids).

Both take the benchmark as a name (``paris6k-250``, ``smvs``, ``ukbench``, ``oxford5k``, ... with
``--root``) or a path (ground-truth file or dataset folder, or a folder-per-object layout), and a
learning set (``--learn``, repeatable) that must be disjoint from the evaluated images.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from selret.cli._app import app
from selret.cli._errors import fail
from selret.cli.encoder import ENCODER_HELP, load_encoder


class Whiten(StrEnum):
    none = "none"
    pcaw = "pcaw"
    both = "both"


class ExperimentName(StrEnum):
    frameworks = "frameworks"
    dims = "dims"
    image_size = "image-size"
    layers = "layers"
    alpha = "alpha"
    masks = "masks"
    baselines = "baselines"


def _load(dataset: str, root: Path | None, protocol: str | None):
    from selret.evaluation.datasets import load_benchmark

    return load_benchmark(dataset, root=root, protocol=protocol)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def _csv(value: str | None, cast=str) -> list | None:
    return None if value is None else [cast(v.strip()) for v in value.split(",") if v.strip()]


@app.command("eval")
def eval_(
    dataset: str = typer.Argument(
        ...,
        help="Benchmark name (paris6k-250, smvs, ukbench, oxford5k, ...; needs --root) or a ground-truth file / dataset folder / folder-per-object layout.",
    ),
    root: Path | None = typer.Option(
        None, help="Dataset folder for a benchmark name; image folder for a ground-truth file."
    ),
    protocol: str | None = typer.Option(
        None,
        help="official-12 | loo (paris6k-250), ns | loo (ukbench), easy | medium | hard (revisited).",
    ),
    encoder_path: str | None = typer.Option(None, "--encoder", "-e", help=ENCODER_HELP),
    preset: str | None = typer.Option(
        None,
        help="Fit this preset on --learn [default: temb-demo-512 unless --encoder or --baseline].",
    ),
    learn: list[Path] | None = typer.Option(
        None,
        "--learn",
        "-l",
        help="Learning-set images (folder, list file or image; repeatable). Must be disjoint from the evaluated images.",
    ),
    baseline: str | None = typer.Option(
        None, help="Evaluate a baseline instead: spoc, mac, gem, rmac or crow."
    ),
    whiten: bool = typer.Option(
        False, "--whiten", help="With --baseline: PCA-whitening learned on --learn."
    ),
    dim: int | None = typer.Option(
        None,
        help="With --baseline --whiten: output dimension [channels, at most learning images - 1].",
    ),
    mask: str | None = typer.Option(None, help="With --preset: sift, sum, max or none [max]."),
    weights: str | None = typer.Option(None, help="Backbone weights [vgg16-caffe]."),
    layer: str | None = typer.Option(None, help="Backbone layer [pool5]."),
    max_side: int | None = typer.Option(None, "--max-side", help="Longest image side [1024]."),
    seed: int | None = typer.Option(None, help="Random seed of the encoder fit [0]."),
    cache: Path | None = typer.Option(
        None, help="Feature cache [$SELRET_CACHE or ~/.cache/selret/features]."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Report folder [runs/eval-<dataset>-<protocol>-<method>]."
    ),
    contact_queries: int = typer.Option(
        4, help="Queries shown in the contact sheet (0: no contact sheet)."
    ),
    top_k: int = typer.Option(6, "--top-k", help="Results per query in the contact sheet."),
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Evaluate a method on a benchmark: mAP (and top-1, per group, N-S), report.json + report.md + contact.png."""
    from selret.encoding.encoder import Encoder
    from selret.errors import SelretError
    from selret.evaluation.baselines import BaselineEncoder
    from selret.evaluation.methods import as_method
    from selret.evaluation.plots import contact_sheet
    from selret.evaluation.runs import evaluate

    if sum(x is not None for x in (encoder_path, baseline)) + (preset is not None) > 1:
        raise typer.BadParameter("give one of --encoder, --preset or --baseline")
    if encoder_path is not None and any(
        v is not None for v in (mask, weights, layer, max_side, seed)
    ):
        raise typer.BadParameter(
            "--mask/--weights/--layer/--max-side/--seed set a config to fit; a fitted --encoder has its own"
        )
    try:
        bench = _load(dataset, root, protocol)
        if encoder_path is not None or (baseline is None and preset is None and not learn):
            method = load_encoder(encoder_path)  # None: the default pre-trained encoder
        elif baseline is not None:
            method = BaselineEncoder(
                baseline, whiten=whiten, n_components=dim, weights=weights or "vgg16-caffe",
                layer=layer or "pool5", max_side=max_side or 1024,
            )  # fmt: skip
        else:
            from selret.cli.encoder import config_from_options

            config = config_from_options(
                preset, dict(mask=mask, weights=weights, layer=layer, max_side=max_side, seed=seed)
            )
            method = Encoder(config)
        needs_learn = as_method(method).needs_fit
        if needs_learn and not learn:
            raise typer.BadParameter(
                "this method learns parameters: give a held-out learning set with --learn"
            )
        report = evaluate(
            bench,
            method,
            learn=learn if needs_learn else None,
            cache_dir=cache,
            device=device,
            progress=progress,
        )
    except (SelretError, ValueError, FileNotFoundError) as exc:
        fail(exc)
    out = out or Path("runs") / _slug(
        f"eval-{bench.name}-{bench.protocol}-{report.label}-{report.method.get('mask')}"
    )
    js, md = report.save(out)
    typer.echo(report.to_markdown())
    written = [js, md]
    if contact_queries > 0:
        aps = [q["ap"] for q in report.per_query]
        written.append(
            contact_sheet(
                bench,
                report.ranks,
                out / "contact.png",
                n_queries=contact_queries,
                k=top_k,
                aps=aps,
            )
        )
    typer.echo("written: " + ", ".join(str(p) for p in written))


@app.command()
def experiment(
    name: ExperimentName = typer.Argument(
        ...,
        help="frameworks (Table 3), dims (Fig. 4), image-size (Table 5), layers (Fig. 5), alpha (Fig. 3), masks (Fig. 2), baselines (Table 6).",
    ),
    dataset: str = typer.Argument(
        ..., help="Benchmark name (needs --root) or path, as for `selret eval`."
    ),
    root: Path | None = typer.Option(None, help="Dataset folder for a benchmark name."),
    protocol: str | None = typer.Option(None, help="Benchmark protocol (see `selret eval`)."),
    learn: list[Path] | None = typer.Option(
        None,
        "--learn",
        "-l",
        help="Learning-set images (repeatable), disjoint from the evaluated images.",
    ),
    max_learn: int | None = typer.Option(
        None,
        help="Use a random subset of this many learning images (image-size and layers default to 100: they extract per setting).",
    ),
    masks: str | None = typer.Option(
        None,
        help="Comma-separated masks [frameworks, masks: all; dims: sift,sum,max; others: max].",
    ),
    presets: str | None = typer.Option(
        None,
        help="dims / baselines: comma-separated presets [dims: 512..4096; baselines: temb-demo-512,temb-demo-1024].",
    ),
    preset: str = typer.Option(
        "temb-demo-512", help="image-size, layers, alpha, masks: the encoder preset."
    ),
    frameworks: str | None = typer.Option(
        None, help="frameworks: subset, e.g. 'T-emb+demo,VLAD+sum' [all six]."
    ),
    sizes: str | None = typer.Option(
        None, help="image-size: comma-separated longest sides [724,1024]."
    ),
    layers: str | None = typer.Option(
        None, help="layers: comma-separated layers [conv4_1 ... pool5]."
    ),
    alphas: str | None = typer.Option(
        None, help="alpha: comma-separated exponents [0.1,0.2,...,1.0]."
    ),
    baselines: str | None = typer.Option(
        None, help="baselines: comma-separated [spoc,mac,gem,rmac,crow]."
    ),
    whiten: Whiten = typer.Option(
        Whiten.both, help="baselines: without (none), with (pcaw) or both ways of PCA-whitening."
    ),
    weights: str = typer.Option("vgg16-caffe", help="Backbone weights."),
    layer: str = typer.Option("pool5", help="Backbone layer (except for the layers experiment)."),
    max_side: int = typer.Option(
        1024, "--max-side", help="Longest image side (except for image-size)."
    ),
    kmeans_iters: int | None = typer.Option(None, help="k-means iterations of every fit [100]."),
    seed: int = typer.Option(0, help="Seed of the fits and of --max-learn."),
    cache: Path | None = typer.Option(
        None, help="Feature cache [$SELRET_CACHE or ~/.cache/selret/features]."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder [runs/experiment-<name>-<dataset>]."
    ),
    encoders: Path | None = typer.Option(
        None,
        "--encoders",
        help="Keep fitted encoders here and reuse them for the same config and learning set (e.g. across protocols).",
    ),
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
    progress: bool = typer.Option(True, help="Show extraction progress bars."),
) -> None:
    """Run one of the paper's experiments; writes NAME.json, NAME.md and NAME.png and prints the table."""
    from selret.errors import SelretError
    from selret.evaluation import experiments as ex

    if not learn:
        raise typer.BadParameter("give a held-out learning set with --learn")
    if max_learn is None and name in (ExperimentName.image_size, ExperimentName.layers):
        max_learn = 100
    base = {"seed": seed} | ({"kmeans_iters": kmeans_iters} if kmeans_iters else {})
    try:
        bench = _load(dataset, root, protocol)
        setup = ex.make_setup(
            bench, learn, max_learn=max_learn, seed=seed, weights=weights, layer=layer,
            max_side=max_side, cache_dir=cache, device=device, base=base, progress=progress,
            encoder_dir=encoders,
        )  # fmt: skip
        mask_list = _csv(masks)
        if name == ExperimentName.frameworks:
            chosen = _csv(frameworks)
            unknown = set(chosen or []) - set(ex.FRAMEWORKS)
            if unknown:
                raise ValueError(
                    f"unknown frameworks {sorted(unknown)}; choose from {', '.join(ex.FRAMEWORKS)}"
                )
            fw = {k: v for k, v in ex.FRAMEWORKS.items() if chosen is None or k in chosen}
            result = ex.frameworks(setup, masks=mask_list or ex.MASKS, frameworks=fw)
        elif name == ExperimentName.dims:
            result = ex.dimensions(
                setup,
                presets=_csv(presets) or ex.DIM_PRESETS,
                masks=mask_list or ("sift", "sum", "max"),
            )
        elif name == ExperimentName.image_size:
            result = ex.image_sizes(
                setup,
                sizes=_csv(sizes, int) or (724, 1024),
                masks=mask_list or ("max",),
                preset=preset,
            )
        elif name == ExperimentName.layers:
            result = ex.layers(
                setup, layers=_csv(layers) or ex.LAYERS, masks=mask_list or ("max",), preset=preset
            )
        elif name == ExperimentName.alpha:
            result = ex.alphas(
                setup,
                alphas=_csv(alphas, float) or ex.ALPHAS,
                masks=mask_list or ("max",),
                preset=preset,
            )
        elif name == ExperimentName.masks:
            result = ex.masks(setup, masks=mask_list or ex.MASKS, preset=preset)
        else:
            w = {Whiten.none: (False,), Whiten.pcaw: (True,), Whiten.both: (False, True)}[whiten]
            result = ex.baselines(
                setup, baselines=_csv(baselines) or ex.BASELINE_NAMES, whiten=w,
                masks=mask_list or ("max",), presets=_csv(presets) or ("temb-demo-512", "temb-demo-1024"),
            )  # fmt: skip
    except (SelretError, ValueError, FileNotFoundError) as exc:
        fail(exc)
    out = out or Path("runs") / _slug(f"experiment-{name.value}-{bench.name}-{bench.protocol}")
    files = result.save(out)
    typer.echo(result.to_markdown())
    typer.echo(f"({result.seconds:.0f} s) written: " + ", ".join(str(p) for p in files))
