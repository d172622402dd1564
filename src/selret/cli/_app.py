"""The one typer application every command module registers on, and its global options."""

import typer

from selret.cli._errors import ReportingGroup

app = typer.Typer(
    cls=ReportingGroup,
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
    debug: bool = typer.Option(
        False,
        "--debug",
        envvar="SELRET_DEBUG",
        help="Show the full traceback of an error instead of its one-line summary.",
    ),
) -> None:
    # ``debug`` is read by ReportingGroup from the parsed parameters.
    if threads is not None:
        # Imported here: torch and faiss make `selret --help` slow.
        from selret.threads import set_threads

        set_threads(threads)


def command_line(ctx: typer.Context) -> str:
    """The running command as a shell line with the options the user set (defaults left out),
    rebuilt from the parsed parameters of ``ctx``: the same under the `selret` script and in tests."""
    import shlex
    from enum import Enum

    parts = ["selret", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            values = value if isinstance(value, (list, tuple)) else [value]
            parts += [str(v) for v in values if v is not None]
            continue
        if value is None or value == param.default or not param.opts:
            continue
        if getattr(param, "is_flag", False) and isinstance(value, bool):
            parts += (param.opts if value else param.secondary_opts)[:1]
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts += [param.opts[0], str(v.value if isinstance(v, Enum) else v)]
    return shlex.join(parts)
