"""``selret distributed encode|ingest``: encode a large collection on a Ray cluster into shards,
then add the shards to an index (see ``docs/SCALE_OUT.md``)."""

from __future__ import annotations

from pathlib import Path

import typer

from selret.cli._app import app
from selret.cli._errors import fail

distributed_app = typer.Typer(
    help="Encode large collections with Ray Data into vector shards, and ingest the shards into an index.",
    no_args_is_help=True,
)
app.add_typer(distributed_app, name="distributed")


def _parse_concurrency(value: str | None) -> int | tuple[int, int] | None:
    """``"4"`` -> 4 actors; ``"2:8"`` -> an autoscaling pool of 2 to 8 actors."""
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise typer.BadParameter(f"{value!r}: give N or MIN:MAX actors", param_hint="--concurrency")


@distributed_app.command("encode")
def encode(
    input: Path = typer.Argument(
        ..., help="Images: a folder or a list file, at the same path on every node."
    ),
    encoder_path: Path = typer.Option(
        ..., "--encoder", "-e", help="A fitted encoder (.npz), at the same path on every node."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Shard folder (shared storage on a cluster). Rerunning resumes."
    ),
    address: str | None = typer.Option(
        None, help="Ray cluster: auto, ray://HOST:10001 [$RAY_ADDRESS, else a local Ray]."
    ),
    num_gpus: float | None = typer.Option(
        None, "--num-gpus", help="GPUs per encoding actor (0 = CPU) [1 if the cluster has GPUs]."
    ),
    concurrency: str | None = typer.Option(
        None,
        help="Encoding actors: N, or MIN:MAX to autoscale (default: one per GPU share, else CPUs - 1).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per backbone forward pass."),
    num_shards: int | None = typer.Option(
        None, "--num-shards", help="About how many shards to write [10000 images per shard]."
    ),
    cpus_per_worker: float = typer.Option(
        1.0, "--cpus-per-worker", help="CPUs (torch threads) per encoding actor."
    ),
) -> None:
    """Encode INPUT's images with Ray Data into vector shards under --out."""
    from selret.distributed import encode_collection
    from selret.errors import SelretError

    pool = _parse_concurrency(concurrency)
    try:
        summary = encode_collection(
            input, encoder_path, out, num_shards=num_shards, batch_size=batch_size,
            num_gpus_per_worker=num_gpus, concurrency=pool, ray_address=address,
            cpus_per_worker=cpus_per_worker,
        )  # fmt: skip
    except (SelretError, ValueError, FileNotFoundError) as exc:
        fail(exc)
    for path, reason in summary.failed:
        typer.echo(f"failed {path}: {reason}", err=True)
    typer.echo(summary.summary())


@distributed_app.command("ingest")
def ingest(
    shards: Path = typer.Argument(..., help="Shard folder written by `selret distributed encode`."),
    index: Path = typer.Option(
        ...,
        "--index",
        help="An engine folder (encoder.npz + index/) or an ImageIndex folder; created if missing.",
    ),
    encoder_path: Path | None = typer.Option(
        None,
        "--encoder",
        "-e",
        help="With a new --index: create a search engine with this encoder (else a bare index).",
    ),
    kind: str = typer.Option(
        "exact",
        help="Index kind when creating: exact, hnsw, ivfpq, ivf, binary or auto (exact below 20k vectors, ivf above).",
    ),
) -> None:
    """Add every shard to one index (images already indexed are skipped)."""
    from selret.distributed import ingest_shards
    from selret.errors import SelretError

    try:
        report = ingest_shards(shards, index, encoder_path=encoder_path, kind=kind)
    except (SelretError, ValueError, FileNotFoundError, FileExistsError) as exc:
        fail(exc)
    for failure in report.failures:
        typer.echo(
            f"not encoded {failure['path']}: {failure['error']}: {failure['reason']}", err=True
        )
    typer.echo(
        f"{report.shards} shards: added {report.added}, already indexed {report.skipped}, "
        f"{len(report.failures)} images failed encoding -> {report.index_path}"
    )
