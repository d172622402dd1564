"""benchmarks/http_load.py runs end to end (tiny settings; nothing is timed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "http_load.py"


def run(tmp_path: Path, *options: str) -> dict:
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--max-side", "64", "--workdir", str(tmp_path),
         "-t", "3", "--warmup", "1", "--json", str(out), *options],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_load_table_rows(tmp_path):
    rows = run(tmp_path, "--clients", "1,3")["rows"]
    assert [(r["mode"], r["clients"]) for r in rows] == [
        ("serial", 1), ("batched", 1), ("serial", 3), ("batched", 3),
    ]  # fmt: skip
    for r in rows:
        assert r["errors"] == 0 and r["completed"] > 0, r
        assert r["p50_ms"] <= r["p99_ms"] and r["peak_rss_mb"] > 0 and r["cpu_s_per_search"] > 0
    assert rows[0]["mean_batch"] == 1.0


def test_abuse_rows(tmp_path):
    rows = run(tmp_path, "--abuse", "--abuse-clients", "2", "--slow-loris", "1", "--png-mp", "4")
    clean, abused = rows["rows"]
    assert (clean["mode"], abused["mode"]) == ("clean", "abused")
    assert clean["errors"] == abused["errors"] == 0 and abused["completed"] > 0
    # The 4-MP PNG is under the default 16-MP query cap: it is searched, not refused.
    assert set(abused["png_client"]["statuses"]) <= {"200", "unfinished"}
    assert abused["slow_loris"]["connections"] >= 1
