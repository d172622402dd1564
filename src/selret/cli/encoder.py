"""``selret fit`` (learn an encoder) and ``selret encode`` (images -> vectors file)."""

from __future__ import annotations

from pathlib import Path

import typer

from selret.cli._app import app, command_line


def config_from_options(
    preset: str | None,
    config_overrides: dict,
):
    """An EncoderConfig from a preset name and the options the user set (None = not set)."""
    from selret.encoding.encoder import EncoderConfig
    from selret.encoding.presets import DEFAULT_PRESET

    overrides = {k: v for k, v in config_overrides.items() if v is not None}
    return EncoderConfig.from_preset(preset or DEFAULT_PRESET, **overrides)


ENCODER_HELP = (
    "A fitted encoder: a .npz file (from `selret fit`) or the name of a pre-trained one "
    "(`selret encoders` lists them) [default: the default pre-trained encoder]."
)


def load_encoder(name_or_path: str | None):
    """The encoder a command was given, or the default pre-trained one; says which on stderr."""
    from selret.encoding.pretrained import default_name, resolve_encoder

    chosen = name_or_path or default_name()
    if chosen is None:
        raise typer.BadParameter("no encoder given and no pre-trained encoder is installed")
    encoder = resolve_encoder(chosen)  # an unusable one: one error line, exit code 6
    if name_or_path is None:
        typer.echo(
            f"encoder: {chosen} (pre-trained, shipped with selret; D={encoder.dim}, "
            f"{encoder.config.mask}-mask; choose another with --encoder)",
            err=True,
        )
    return encoder


@app.command()
def encoders(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the pre-trained encoders shipped with selret (use a name wherever --encoder is asked)."""
    import json

    from selret.encoding.persistence import read_header
    from selret.encoding.pretrained import available, default_name, pretrained_path

    rows = []
    for info in available():
        provenance = read_header(pretrained_path(info.name)).get("provenance") or {}
        learning = provenance.get("learning_set", {})
        rows.append({
            "name": info.name, "default": info.name == default_name(), "dim": info.dim,
            "mask": info.mask, "description": info.description, "sha256": info.sha256,
            "learning_set": learning.get("source"), "learning_images": learning.get("n_images"),
            "fingerprint": provenance.get("fingerprint"),
            "fit_command": provenance.get("fit_command"),
        })  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no pre-trained encoders are installed")
    for r in rows:
        mark = " (default)" if r["default"] else ""
        typer.echo(f"{r['name']}{mark}: D={r['dim']}, {r['mask']}-mask; {r['description']}")
        typer.echo(f"    learned on {r['learning_images']} images of {r['learning_set']}")
        typer.echo(f"    fit: {r['fit_command']}")
        typer.echo(f"    sha256 {r['sha256']}  fingerprint {r['fingerprint']}")


@app.command()
def fit(
    ctx: typer.Context,
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
    upscale: bool = typer.Option(
        True,
        "--upscale/--no-upscale",
        help="Enlarge learning images smaller than --max-side to it (the paper's protocol), or "
        "extract them at their own size.",
    ),
    precision: str = typer.Option(
        "float32", help="Storage of the learned matrices: float32 (exact) or float16 (half size)."
    ),
) -> None:
    """Learn an encoder (PCA, codebook, whitening, rotation) on a held-out learning set.

    The file's header records how it was made: this command line, the learning-set manifest (file
    names and sha256), the selret version, D, the mask and the encoder's fingerprint.
    """
    from selret.cli._scan import images
    from selret.encoding.encoder import Encoder
    from selret.features.extractor import Extractor

    config = config_from_options(preset, dict(
        mask=mask, embedding=embedding, aggregation=aggregation, d=d, k=k, alpha=alpha,
        rotation=rotation, drop=drop, weights=weights, layer=layer, max_side=max_side, seed=seed,
    ))  # fmt: skip
    paths = images(learn)
    extractor = Extractor.for_config(config, cache=cache, device=device, upscale=upscale)
    maps = extractor.maps(paths, progress=True)
    _report_failures(maps.report)
    encoder = Encoder(config).fit(maps, progress=True)
    save_with_provenance(encoder, out, precision, maps.paths, learn, upscale, command_line(ctx))
    typer.echo(
        f"{encoder!r}\nlearned on {encoder.n_train_images_} images, {encoder.n_train_features_} local features "
        f"(mask kept {100 * encoder.kept_fraction_:.1f}%); saved to {out}"
    )


@app.command()
def encode(
    input: Path = typer.Argument(..., help="Images: a folder or a list file."),
    encoder_name: str | None = typer.Option(None, "--encoder", "-e", help=ENCODER_HELP),
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

    from selret.cli._scan import images
    from selret.features.extractor import Extractor
    from selret.files import atomic_write

    encoder = load_encoder(encoder_name)
    paths = images(input)
    maps = Extractor.for_config(encoder.config, cache=cache, device=device).maps(paths)
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


def save_with_provenance(
    encoder, out: Path, precision: str, paths, learn: Path, upscale: bool, command: str
):
    """Save ``encoder`` with a header saying how it was made (see ``selret fit``)."""
    from selret import __version__
    from selret.encoding.encoder import Encoder
    from selret.files import file_digest

    root = Path(learn) if Path(learn).is_dir() else Path(learn).parent
    files = []
    for p in paths:
        try:
            name = Path(p).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:  # a list file may name images anywhere
            name = str(p)
        files.append([name, file_digest(p)])
    provenance = {
        "fit_command": command,
        "learning_set": {
            "source": str(learn),
            "n_images": len(files),
            "upscale": upscale,
            "files": files,
        },
        "selret_version": __version__,
        "dim": encoder.dim,
        "mask": encoder.config.mask,
        "precision": precision,
    }
    encoder.save(out, precision=precision, provenance=provenance)
    # The fingerprint of the encoder as it will be loaded (float16 storage changes it).
    provenance["fingerprint"] = Encoder.load(out).fingerprint
    encoder.save(out, precision=precision, provenance=provenance)


def _report_failures(report) -> None:
    for path, reason in report.failed:
        typer.echo(f"skipped {path}: {reason}", err=True)
