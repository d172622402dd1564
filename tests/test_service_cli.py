"""``selret serve``: its options reach the running service (a real subprocess)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_fixtures import shared_engine

SELRET = [
    sys.executable,
    "-c",
    "import sys; from selret.cli import main; sys.argv[0] = 'selret'; main()",
]
KEY = "cli-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return shared_engine(tmp_path_factory)


def test_serve_options_reach_the_service(engine_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)  # readable by others: warned about
    port = free_port()
    args = ["--threads", "1", "serve", str(engine_dir), "--port", str(port),
            "--batch-size", "4", "--batch-wait-ms", "2", "--forward-max-mp", "1.5", "--max-queue", "7",
            "--query-max-mp", "2.5", "--api-key-file", str(key_file),
            "--cors-origin", "https://a.example", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "SELRET_API_KEY": "ignored-when-a-file-is-given"}
    proc = subprocess.Popen(
        SELRET + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "selret serve did not start"
            time.sleep(0.2)
        assert httpx.get(f"{url}/stats").status_code == 401
        stats = httpx.get(f"{url}/stats", headers={"X-API-Key": KEY}).json()
        assert stats["limits"] == {
            "batch_size": 4,
            "batch_wait_ms": 2.0,
            "forward_max_pixels": 1_500_000,
            "max_queue": 7,
            "query_max_pixels": 2_500_000,
            "max_upload_bytes": 10 * 1024 * 1024,
        }
        cors = httpx.get(f"{url}/health", headers={"Origin": "https://a.example"})
        assert cors.headers["access-control-allow-origin"] == "https://a.example"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert "API key required" in out
    assert f"{key_file} is readable by other users" in err


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--api-key-file", "EMPTY"], "the API key file is empty"),
        (["--api-key-file", "SHORT"], "at least 16 characters"),
        (["--cors-origin", "example.com"], "CORS origin"),
    ],
)
def test_bad_serve_options_are_one_line_errors(engine_dir, tmp_path, options, words):
    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "SHORT").write_text("abc\n")
    options = [str(tmp_path / o) if o in ("EMPTY", "SHORT") else o for o in options]
    result = subprocess.run(
        SELRET + ["serve", str(engine_dir), "--port", str(free_port()), *options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and words in lines[0], lines
    assert "Traceback" not in result.stderr
