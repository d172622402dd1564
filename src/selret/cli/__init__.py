"""Thin command-line interface. Each command group lives in its own module and registers on ``app``.

Heavy libraries (torch, faiss) are imported inside the commands so that ``selret --help`` is fast.
"""

# noqa: F401 below: importing a module registers its commands on ``app``.
from selret.cli import demo as _demo  # noqa: F401
from selret.cli import distributed as _distributed  # noqa: F401
from selret.cli import encoder as _encoder  # noqa: F401
from selret.cli import evaluate as _evaluate  # noqa: F401
from selret.cli import extract as _extract  # noqa: F401
from selret.cli import index as _index  # noqa: F401
from selret.cli import serve as _serve  # noqa: F401
from selret.cli._app import app


def main() -> None:
    app()
