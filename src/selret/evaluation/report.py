"""What an evaluation run measured: :class:`EvalReport` (JSON and markdown, written atomically) and
the summary rows and markdown tables that compare several runs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selret.files import atomic_write_text

# Ranked database indices kept per query in the JSON report.
TOP_KEPT = 10


def json_float(x) -> float | None:
    """A JSON-safe float (NaN -> None)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


@dataclass
class EvalReport:
    """Everything one run measured. Fractions are in [0, 1]; times in seconds.

    ``ranks`` (n_db, n_q) is kept in memory for contact sheets; the JSON keeps the first
    ``TOP_KEPT`` database indices of each query.
    """

    dataset: str
    protocol: str
    n_db: int
    n_queries: int
    method: dict
    dim: int
    learning_set: dict
    map: float
    mp_at_k: dict[int, float]
    top1: float
    per_query: list[dict]
    kept_fraction: float
    times: dict[str, float]
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)
    ns_score: float | None = None
    revisited: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    ranks: np.ndarray | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return str(self.method.get("method"))

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "n_db": self.n_db,
            "n_queries": self.n_queries,
            **{k: v for k, v in self.method.items()},
            "dim": self.dim,
            "learning_set": self.learning_set,
            "map": json_float(self.map),
            "mp_at_k": {str(k): json_float(v) for k, v in self.mp_at_k.items()},
            "top1": json_float(self.top1),
            "ns_score": json_float(self.ns_score),
            "revisited": None
            if self.revisited is None
            else {k: json_float(v) for k, v in self.revisited.items()},
            "per_group": {
                g: {k: json_float(v) for k, v in d.items()} for g, d in self.per_group.items()
            },
            "kept_fraction": json_float(self.kept_fraction),
            "times": {k: round(v, 3) for k, v in self.times.items()},
            "notes": self.notes,
            "per_query": self.per_query,
        }

    def to_markdown(self) -> str:
        """A field/value table, then per-group figures when there are groups."""
        m = self.method
        learn = self.learning_set
        rows = [
            (
                "dataset",
                f"{self.dataset} ({self.protocol}): {self.n_db} database images, {self.n_queries} queries",
            ),
            ("method", m.get("method")),
            (
                "backbone",
                f"VGG16 ({m.get('weights')}), {m.get('layer')}, longest side {m.get('max_side')} px",
            ),
            (
                "mask / embedding / aggregation",
                f"{m.get('mask')} / {m.get('embedding')} / {m.get('aggregation')}",
            ),
            ("post-processing", m.get("whitening")),
            ("D", self.dim),
            ("learning set", f"{learn.get('name') or 'none'} ({learn.get('n_images', 0)} images)"),
            ("mAP", _pct(self.map)),
            (
                "mP@" + "/".join(str(k) for k in self.mp_at_k),
                " / ".join(_pct(v) for v in self.mp_at_k.values()),
            ),
            ("top-1 accuracy", _pct(self.top1)),
        ]
        if self.ns_score is not None:
            rows.append(("N-S score (of 4)", f"{self.ns_score:.2f}"))
        if self.revisited:
            rows.append(
                ("revisited E / M / H", " / ".join(_pct(v) for v in self.revisited.values()))
            )
        rows.append(("features kept by the mask", _pct(self.kept_fraction)))
        rows.append(
            (
                "time (s): extract / fit / encode / search",
                " / ".join(f"{self.times[k]:.1f}" for k in ("extract", "fit", "encode", "search")),
            )
        )
        lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
        if self.per_group:
            lines += ["", "| group | queries | mAP | top-1 |", "|---|---|---|---|"]
            for g, d in self.per_group.items():
                lines.append(f"| {g} | {int(d['n'])} | {_pct(d['map'])} | {_pct(d['top1'])} |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / "report.json", out / "report.md"
        atomic_write_text(js, json.dumps(self.to_dict(), indent=1))
        atomic_write_text(md, self.to_markdown())
        return js, md


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.1f}"


SUMMARY_COLUMNS = ("method", "mask", "D", "learning set", "mAP", "top-1", "N-S", "kept %")


def summary_row(report: EvalReport) -> dict:
    """The columns of :data:`SUMMARY_COLUMNS` for one report (fractions as percentages)."""
    return {
        "method": report.label,
        "mask": report.method.get("mask"),
        "D": report.dim,
        "learning set": f"{report.learning_set.get('name') or 'none'} ({report.learning_set.get('n_images', 0)})",
        "mAP": _pct(report.map),
        "top-1": _pct(report.top1),
        "N-S": "-" if report.ns_score is None else f"{report.ns_score:.2f}",
        "kept %": _pct(report.kept_fraction),
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of dict rows (columns: the given ones, or the first row's keys)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["SUMMARY_COLUMNS", "TOP_KEPT", "EvalReport", "markdown_table", "summary_row"]
