"""The result of one experiment (:mod:`selret.evaluation.experiments`): its rows, a markdown table
with per-group figures, JSON, and the figure of :mod:`selret.evaluation.plots`, all written
atomically."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selret.evaluation.report import markdown_table
from selret.files import atomic_write_text

# Per-group tables wider than this many groups are left to the JSON.
MD_MAX_GROUPS = 8

PERCENT_COLUMNS = ("mAP", "top-1", "kept %", "kept sd", "mean corr")


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in PERCENT_COLUMNS:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


@dataclass
class ExperimentResult:
    """Rows of one experiment (fractions in [0, 1]), the columns to show, and the setup."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict]
    setup: dict
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_markdown(self) -> str:
        s = self.setup
        learn = s["learning_set"]
        head = (
            f"### {self.title}\n\n{s['dataset']} ({s['protocol']}: {s['n_db']} database images, "
            f"{s['n_queries']} queries); VGG16 {s['weights']} {s['layer']}, longest side "
            f"{s['max_side']} px; learning set: {learn['name']} ({learn['n_images']} images).\n\n"
        )
        shown = [{c: _cell(c, r.get(c)) for c in self.columns} for r in self.rows]
        body = markdown_table(shown, self.columns)
        groups = [r for r in self.rows if r.get("per_group")]
        # A table of more groups than this is too wide to read; the JSON keeps them all.
        if groups and len(groups[0]["per_group"]) <= MD_MAX_GROUPS:
            names = list(groups[0]["per_group"])
            keys = [c for c in ("method", "framework", "mask", "D") if c in self.columns]
            extra = [
                {**{c: _cell(c, r.get(c)) for c in keys},
                 **{g: f"{_cell('mAP', r['per_group'][g]['map'])} / {_cell('mAP', r['per_group'][g]['top1'])}" for g in names}}
                for r in groups
            ]  # fmt: skip
            body += "\nPer group, mAP / top-1:\n\n" + markdown_table(extra, keys + names)
        return head + body

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``<name>.json``, ``<name>.md`` and the figure ``<name>.png`` into ``out_dir``, each
        atomically (a crash leaves the old file or the new one, never half of one)."""
        from selret.evaluation.plots import plot_experiment

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, md, png = (out / f"{self.name}.{ext}" for ext in ("json", "md", "png"))
        atomic_write_text(js, json.dumps(self.to_dict(), indent=1, default=_json_default))
        atomic_write_text(md, self.to_markdown())
        plot_experiment(self, png)  # atomic too
        return [js, md, png]


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


__all__ = ["ExperimentResult"]
