"""The package's layering (docs/ARCHITECTURE.md), checked on the source with ``ast``.

base modules (errors, files, numerics, threads, the package itself)
    <- features <- encoding <- search, evaluation <- service, distributed <- cli

A module may import its own package and any package of a lower layer. Packages of one layer
(search and evaluation; service and distributed) do not import each other, and nothing outside
``selret.cli`` imports it. Every ``import`` / ``from ... import`` of ``selret`` counts, at module
level or inside a function or an ``if TYPE_CHECKING:`` block alike.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "selret"

BASE = "base"
BASE_MODULES = {"errors", "files", "numerics", "threads"}
# Layer of each unit; a unit imports only units of strictly lower layers (and itself).
LAYERS = {
    BASE: 0,
    "features": 1,
    "encoding": 2,
    "search": 3,
    "evaluation": 3,
    "service": 4,
    "distributed": 4,
    "cli": 5,
}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a ``selret`` module: its top-level package, or BASE."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE_MODULES:
        return BASE
    if parts[1] not in LAYERS:
        raise AssertionError(
            f"{module} is in no layer: add it to LAYERS or BASE_MODULES in tests/test_layering.py "
            "and to docs/ARCHITECTURE.md"
        )
    return parts[1]


def is_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def selret_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a selret module in ``path``.

    ``from selret import errors`` names the module ``selret.errors`` (a name that is no module,
    such as ``__version__``, names the package); relative imports are resolved against the
    importing module's package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.append((node.lineno, submodule if is_module(submodule) else module))
    return sorted((line, name) for line, name in found if name.split(".")[0] == "selret")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_source_tree_is_there():
    assert PACKAGE.is_dir() and len(modules()) > 20, PACKAGE


def test_imports_follow_the_layers():
    offending = []
    for path in modules():
        source = unit(module_name(path))
        for line, imported in selret_imports(path):
            target = unit(imported)
            if target == source:
                continue
            if target == "cli":
                reason = "nothing outside selret.cli imports it"
            elif LAYERS[target] == LAYERS[source]:
                reason = f"{source} and {target} are one layer and do not import each other"
            elif LAYERS[target] > LAYERS[source]:
                reason = f"{target} is above {source}"
            else:
                continue
            offending.append(f"{path.relative_to(SRC)}:{line}: imports {imported} ({reason})")
    assert not offending, "imports against the layering:\n" + "\n".join(offending)


def test_no_module_is_too_long():
    long = []
    for path in modules():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long.append(f"{path.relative_to(SRC)}: {n} lines")
    assert not long, f"modules over {MAX_LINES} lines (split them by stage):\n" + "\n".join(long)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("selret", BASE),
        ("selret.errors", BASE),
        ("selret.threads", BASE),
        ("selret.features.extractor", "features"),
        ("selret.evaluation.datasets.oxford", "evaluation"),
        ("selret.cli._app", "cli"),
    ],
)
def test_units(module, expected):
    assert unit(module) == expected


def test_import_finder_sees_every_form(tmp_path, monkeypatch):
    pkg = tmp_path / "selret" / "search"
    pkg.mkdir(parents=True)
    for name in ("selret/errors.py", "selret/numerics.py", "selret/search/store.py"):
        (tmp_path / name).touch()
    path = pkg / "probe.py"
    path.write_text(
        "import numpy\n"
        "import selret.cli\n"
        "from selret import errors, numerics\n"
        "from . import store, Engine\n"
        "from selret import __version__\n"
        "from ..encoding.encoder import Encoder\n"
        "def f():\n"
        "    from selret.service.app import create_app\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert selret_imports(path) == [
        (2, "selret.cli"),
        (3, "selret.errors"),
        (3, "selret.numerics"),
        (4, "selret.search"),
        (4, "selret.search.store"),
        (5, "selret"),
        (6, "selret.encoding.encoder"),
        (8, "selret.service.app"),
    ]
