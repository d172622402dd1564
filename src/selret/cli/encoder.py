"""``selret fit`` (learn an encoder) and ``selret encode`` (images -> vectors file)."""

from __future__ import annotations

from pathlib import Path

import typer

from selret.cli._app import app


def config_from_options(
    preset: str | None,
    config_overrides: dict,
):
    """An EncoderConfig from a preset name and the options the user set (None = not set)."""
    from selret.encoding.encoder import EncoderConfig
    from selret.encoding.presets import DEFAULT_PRESET

    overrides = {k: v for k, v in config_overrides.items() if v is not None}
    return EncoderConfig.from_preset(preset or DEFAULT_PRESET, **overrides)


@app.command()
def fit(
    learn: Path = typer.Argument(
        ...,
        help="Learning-set images: a folder or a list file. Must be disjoint from what you will evaluate.",
    ),
    out: Path = typer.Option(
        Path("encoder.npz"), "--out", "-o", help="Where to write the fitted encoder."
    ),
    preset: str | None = typer.Option(
        None,
        help="A paper preset: temb-demo-512/1024/2048/4096/8064, fv-4224, vlad-4224, temb-4224, faemb-4224 [default: temb-demo-512].",
    ),
    mask: str | None = typer.Option(None, help="sift, sum, max or none [preset: max]."),
    embedding: str | None = typer.Option(None, help="temb, vlad, fv or faemb."),
    aggregation: str | None = typer.Option(None, help="sum, average or democratic."),
    d: int | None = typer.Option(None, help="PCA dimension of local features."),
    k: int | None = typer.Option(None, help="Codebook size."),
    alpha: float | None = typer.Option(None, help="Power-law exponent (1 = none) [0.5]."),
    rotation: str | None = typer.Option(None, help="rotation, whitening or none [rotation]."),
    drop: int | None = typer.Option(
        None, help="Leading rotated components to drop [128 for temb, d(d+1) for faemb, else 0]."
    ),
    weights: str | None = typer.Option(None, help="Backbone weights [vgg16-caffe]."),
    layer: str | None = typer.Option(None, help="Backbone layer [pool5]."),
    max_side: int | None = typer.Option(None, "--max-side", help="Longest image side [1024]."),
    seed: int | None = typer.Option(None, help="Random seed [0]."),
    cache: Path | None = typer.Option(
        None, help="Feature cache [$SELRET_CACHE or ~/.cache/selret/features]."
    ),
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
) -> None:
    """Learn an encoder (PCA, codebook, whitening, rotation) on a held-out learning set."""
    from selret.encoding.encoder import Encoder
    from selret.features.extractor import feature_maps_for
    from selret.files import list_images

    config = config_from_options(preset, dict(
        mask=mask, embedding=embedding, aggregation=aggregation, d=d, k=k, alpha=alpha,
        rotation=rotation, drop=drop, weights=weights, layer=layer, max_side=max_side, seed=seed,
    ))  # fmt: skip
    paths = list_images(learn)
    if not paths:
        raise typer.BadParameter(f"{learn}: no images found", param_hint="LEARN")
    maps = feature_maps_for(paths, config, cache, device=device)
    _report_failures(maps.report)
    encoder = Encoder(config).fit(maps, progress=True)
    encoder.save(out)
    typer.echo(
        f"{encoder!r}\nlearned on {encoder.n_train_images_} images, {encoder.n_train_features_} local features "
        f"(mask kept {100 * encoder.kept_fraction_:.1f}%); saved to {out}"
    )


@app.command()
def encode(
    input: Path = typer.Argument(..., help="Images: a folder or a list file."),
    encoder_path: Path = typer.Option(
        ..., "--encoder", "-e", help="A fitted encoder (.npz from `selret fit`)."
    ),
    out: Path = typer.Option(
        Path("vectors.npz"),
        "--out",
        "-o",
        help="Output .npz with `vectors` (N x D float32) and `paths`.",
    ),
    cache: Path | None = typer.Option(
        None, help="Feature cache [$SELRET_CACHE or ~/.cache/selret/features]."
    ),
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
) -> None:
    """Encode images into global vectors with a fitted encoder."""
    import numpy as np

    from selret.encoding.encoder import Encoder
    from selret.features.extractor import feature_maps_for
    from selret.files import atomic_write, list_images

    encoder = Encoder.load(encoder_path)
    paths = list_images(input)
    if not paths:
        raise typer.BadParameter(f"{input}: no images found", param_hint="INPUT")
    maps = feature_maps_for(paths, encoder.config, cache, device=device)
    _report_failures(maps.report)
    # The GPU when there is one, for the per-feature stages too.
    vectors = encoder.encode_many(maps, progress=True, device=device or "auto")
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(
        vectors=vectors,
        paths=np.array([str(p) for p in maps.paths]),
        fingerprint=np.array(encoder.fingerprint),
    )
    atomic_write(out, lambda fh: np.savez(fh, **arrays))
    typer.echo(f"encoded {len(vectors)} images into {vectors.shape[1]}-D vectors -> {out}")


def _report_failures(report) -> None:
    for path, reason in report.failed:
        typer.echo(f"skipped {path}: {reason}", err=True)
