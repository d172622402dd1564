"""The one typer application every command module registers on, and its global options."""

import typer

app = typer.Typer(
    name="selret",
    help="Selective deep convolutional features for image retrieval: extract, fit, encode, index, search, evaluate, serve.",
    no_args_is_help=True,
    add_completion=False,
    # Plain help text: with Rich markup, the "[default: ...]" notes in option help vanish as tags.
    rich_markup_mode=None,
)


@app.callback()
def _global_options(
    threads: int | None = typer.Option(
        None,
        "--threads",
        envvar="SELRET_THREADS",
        min=1,
        help="Threads for torch, faiss and BLAS in this process [default: all cores]. One thread "
        "per process is fastest when several selret processes share a machine.",
    ),
) -> None:
    if threads is not None:
        # Imported here: torch and faiss make `selret --help` slow.
        from selret.threads import set_threads

        set_threads(threads)
