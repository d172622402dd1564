"""End-to-end HTTP latency and throughput of the search service (selret.service.server).

Starts the server (``selret.service.server.run``, one uvicorn process) on loopback in a subprocess, then
measures from a client in this process (httpx):

1. search latency of one query image, one client, N sequential requests (after a warm-up);
2. a bounded load run: C concurrent clients (threads) searching for at most T seconds or R
   requests in all, whichever comes first;
3. cached thumbnail latency (GET /images/{id}), one client;

and prints one table row each: requests, errors, throughput, mean / p50 / p99 latency.

    python benchmarks/http_load.py                         # builds a small random-weights engine
    python benchmarks/http_load.py --engine ENGINE_DIR --query photo.jpg -c 8 -t 60 -r 1000

Without ``--engine``, an engine is built under ``--workdir`` from the bundled demo photos
(selret.evaluation.demo_data: 40 indexed images, encoder fitted on the disjoint learning set) with
*random* backbone weights: timings are real, rankings meaningless. Without ``--query``, the first
demo query (or, for a given engine, the indexed image 1 at 1024 px) is the query image.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

SERVER_CODE = (
    "import sys; from selret.service.server import run; "
    "run(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')"
)


def build_random_engine(workdir: Path, max_side: int) -> tuple[Path, Path]:
    """A random-weights engine over the demo database; returns (engine dir, a query image)."""
    from selret.encoding.encoder import Encoder, EncoderConfig
    from selret.evaluation.demo_data import build_demo_dataset, learning_images
    from selret.features.extractor import Extractor
    from selret.search.engine import SearchEngine

    engine_dir = workdir / f"engine-random-{max_side}"
    bench = build_demo_dataset(workdir / "data")
    query = bench.query_path(bench.queries[0])
    if (engine_dir / "encoder.npz").is_file():
        return engine_dir, query
    cache = workdir / "features"
    config = EncoderConfig.from_preset(
        "temb-demo-512", weights="random", max_side=max_side, kmeans_iters=20
    )
    encoder = Encoder(config).fit(
        Extractor.for_config(config, cache=cache).maps(
            learning_images(workdir / "data"), progress=False
        )
    )
    engine = SearchEngine.create(engine_dir, encoder, cache_dir=cache)
    engine.add_images([bench.image_path(i) for i in range(len(bench.db_images))], progress=False)
    return engine_dir, query


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine_dir: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(engine_dir), str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


class Recorder:
    """Latencies (s) of successful requests and the error count, thread-safe."""

    def __init__(self):
        self.latencies: list[float] = []
        self.errors = 0
        self.lock = threading.Lock()

    def timed(self, client: httpx.Client, send) -> None:
        start = time.perf_counter()
        try:
            ok = send(client).status_code == 200
        except httpx.HTTPError:
            ok = False
        seconds = time.perf_counter() - start
        with self.lock:
            if ok:
                self.latencies.append(seconds)
            else:
                self.errors += 1


def sequential(url: str, send, n: int, timeout: float) -> tuple[Recorder, float]:
    rec = Recorder()
    with httpx.Client(base_url=url, timeout=timeout) as client:
        start = time.perf_counter()
        for _ in range(n):
            rec.timed(client, send)
    return rec, time.perf_counter() - start


def load(
    url: str, send, clients: int, seconds: float, max_requests: int, timeout: float
) -> tuple[Recorder, float]:
    """``clients`` threads sending until ``seconds`` have passed or ``max_requests`` were sent."""
    rec = Recorder()
    budget = [max_requests]
    budget_lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker():
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while time.perf_counter() < deadline:
                with budget_lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                rec.timed(client, send)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rec, time.perf_counter() - start


def row(label: str, rec: Recorder, elapsed: float) -> str:
    done = len(rec.latencies)
    ms = np.asarray(rec.latencies) * 1000
    stats = (
        f"{ms.mean():8.1f} {np.percentile(ms, 50):8.1f} {np.percentile(ms, 99):8.1f}"
        if done
        else f"{'-':>8} {'-':>8} {'-':>8}"
    )
    return f"{label:34s} {done + rec.errors:8d} {rec.errors:6d} {done / elapsed:8.2f} {stats}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engine", type=Path, help="engine directory [build a random-weights demo engine]"
    )
    parser.add_argument(
        "--query", type=Path, help="query image [the first demo query / indexed image 1]"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "selret-http-load",
                        help="where the built engine goes (reused across runs)")  # fmt: skip
    parser.add_argument(
        "--max-side", type=int, default=256, help="image size of the built engine [256]"
    )
    parser.add_argument(
        "-n", "--sequential", type=int, default=20, help="sequential searches for the latency [20]"
    )
    parser.add_argument(
        "-c", "--clients", type=int, default=4, help="concurrent clients in the load run [4]"
    )
    parser.add_argument(
        "-t", "--seconds", type=float, default=30.0, help="load run time limit in seconds [30]"
    )
    parser.add_argument(
        "-r", "--requests", type=int, default=200, help="load run request limit [200]"
    )
    parser.add_argument("-k", "--top-k", type=int, default=10, help="results per search [10]")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="per-request and server-start timeout (s)"
    )
    args = parser.parse_args()

    query = args.query
    if args.engine is None:
        t0 = time.perf_counter()
        engine_dir, demo_query = build_random_engine(args.workdir, args.max_side)
        query = query or demo_query
        print(
            f"engine: {engine_dir} (random weights, max_side {args.max_side}; ready in {time.perf_counter() - t0:.1f} s)"
        )
    else:
        engine_dir = args.engine
    proc, url = start_server(engine_dir, args.timeout)
    try:
        if query is not None:
            image = query.read_bytes()
        else:
            image = (
                httpx.get(f"{url}/images/1", params={"size": 1024}, timeout=args.timeout)
                .raise_for_status()
                .content
            )
        stats = httpx.get(f"{url}/stats").json()
        name = query.name if query is not None else "indexed image 1"

        def search(client: httpx.Client) -> httpx.Response:
            return client.post(
                "/search",
                files={"image": (name, image, "image/jpeg")},
                data={"top_k": str(args.top_k)},
            )

        def thumbnail(client: httpx.Client) -> httpx.Response:
            return client.get("/images/1")

        sequential(url, search, 2, args.timeout)  # warm-up
        sequential(url, thumbnail, 1, args.timeout)
        results = [
            (
                f"search, 1 client x {args.sequential}",
                *sequential(url, search, args.sequential, args.timeout),
            ),
            (
                f"search, {args.clients} clients (<={args.seconds:g} s, <={args.requests})",
                *load(url, search, args.clients, args.seconds, args.requests, args.timeout),
            ),
            (
                f"thumbnail (cached), 1 client x {10 * args.sequential}",
                *sequential(url, thumbnail, 10 * args.sequential, args.timeout),
            ),
        ]
        server_stats = httpx.get(f"{url}/stats").json()
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"index: {stats['count']} images, {stats['dim']}-D {stats['kind']}; {stats['encoder']}")
    print(f"query: {name} ({len(image)} bytes); top_k {args.top_k}; machine: {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(
        f"\n{'measurement':34s} {'requests':>8} {'errors':>6} {'req/s':>8} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8}"
    )
    for label, rec, elapsed in results:
        print(row(label, rec, elapsed))
    print(
        f"\nserver: {server_stats['searches']} searches served, mean server-side latency {server_stats['mean_latency_ms']} ms"
    )


if __name__ == "__main__":
    main()
