"""The one typer application every command module registers on."""

import typer

app = typer.Typer(
    name="selret",
    help="Selective deep convolutional features for image retrieval: extract, fit, encode, index, search, evaluate, serve.",
    no_args_is_help=True,
    add_completion=False,
)
