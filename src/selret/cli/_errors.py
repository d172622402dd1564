"""How the ``selret`` command reports a failure: one ``error: <what>: <why>`` line on stderr, a
``hint: ...`` line where there is one, and a documented exit code (:class:`selret.errors.ExitCode`,
the table in ``docs/CLI.md``). Tracebacks only with ``selret --debug``.

:class:`ReportingGroup` applies this to every command of the app; commands that want to go on
after an error (or pick the moment) call :func:`report` or :func:`fail` themselves.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from typer.core import TyperGroup

from selret.errors import ExitCode, SelretError

try:  # typer >= 0.2x ships its own copy of click; its usage errors are that copy's
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - typer on the click package
    from click.exceptions import ClickException

#: What typer/click handle themselves: usage errors (exit 2) and deliberate exits.
_PASS_THROUGH = (ClickException, typer.Exit, typer.Abort)

DEBUG_HINT = "rerun with `selret --debug ...` to see the traceback"


def describe(exc: BaseException) -> tuple[str, str | None, int]:
    """(message, hint or None, exit code) of an exception, the message on one line."""
    if isinstance(exc, SelretError):
        message, hint, code = str(exc), exc.hint, exc.exit_code
    elif isinstance(exc, OSError):
        # Errors on paths the user named: missing, a folder where a file was expected,
        # permissions, a full disk. ``filename`` is set when the OS reported it.
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"{where}{exc.strerror}" if exc.strerror else str(exc)
        code, hint = ExitCode.INPUT, None
    elif isinstance(exc, ValueError):
        # Values that only turn out invalid once the command runs (a preset name, an index kind).
        message, hint, code = str(exc), None, ExitCode.USAGE
    else:
        message, hint, code = f"unexpected {type(exc).__name__}: {exc}", DEBUG_HINT, ExitCode.ERROR
    return " ".join(message.split()) or type(exc).__name__, hint, int(code)


def report(exc: BaseException) -> int:
    """Print ``error: ...`` (and ``hint: ...``) for ``exc`` on stderr; return its exit code."""
    message, hint, code = describe(exc)
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {' '.join(hint.split())}", err=True)
    return code


def fail(exc: BaseException) -> NoReturn:
    """:func:`report` ``exc`` and end the command with its exit code."""
    raise typer.Exit(report(exc))


class ReportingGroup(TyperGroup):
    """The app's root command: any exception a command lets through is reported by :func:`report`
    (one line, exit code by class), unless ``--debug`` is on; click's own usage errors and exits
    pass through untouched."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            fail(exc)
