"""HTTP throughput and latency of the search service (``selret serve``), serial against micro-batched,
and under abuse.

Each configuration gets a fresh server (``selret --threads T serve ...`` in a subprocess, loopback),
so no run inherits another's queue; clients are threads of this process (httpx). Per run it prints:
clients, requests completed in the time window, errors, unfinished at the window's end (still
queued: not errors), throughput, p50 / p99 latency of the completed requests, the mean batch the
server ran, its CPU seconds per answered search (all threads: on a shared machine a fairer cost
than wall time) and its peak RSS (VmRSS sampled every 0.2 s). Clients that get 503 wait as its
Retry-After says.

    # real weights, shipped encoder, default size 1024 (--seed-cache: maps already computed)
    python benchmarks/http_load.py --images ../shared/data/paris6k-250/jpg -n 48 -t 90 --seed-cache DIR
    # a quicker run at 256 px (the shipped encoder applied to 256-px maps)
    python benchmarks/http_load.py --images ../shared/data/ukbench-56/jpg -n 16 --max-side 256 -t 40
    # 50 clients, then 50 clients + 5 slow-loris clients + one client posting a 64-MP PNG
    python benchmarks/http_load.py --images ../shared/data/ukbench-56/jpg -n 16 --max-side 256 --abuse
    # seconds, no weights needed: random backbone, 128 px, the embedded demo photos
    python benchmarks/http_load.py --quick

``serial`` is the server with ``--batch-size 1`` (one query per forward, as before batching);
``batched`` uses ``--batch-size`` / ``--batch-wait-ms``. With ``--max-side`` other than the
encoder's own, the encoder's learned parameters are applied to maps of that size (timings are
real, rankings approximate). Engines are built once under ``--workdir`` and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import numpy as np

SERVER_CODE = "import sys; from selret.cli import main; sys.argv[0] = 'selret'; main()"


# ===================================================================== engine


def build_engine(args) -> tuple[Path, Path]:
    """The engine to serve (built once under --workdir) and a query image not in it."""
    from selret.encoding.encoder import Encoder, EncoderConfig
    from selret.features.cache import FeatureCache
    from selret.features.extractor import Extractor
    from selret.files import list_images
    from selret.search.engine import SearchEngine

    if args.quick:
        from selret.evaluation.demo_data import build_demo_dataset, learning_images

        bench = build_demo_dataset(args.workdir / "demo")
        paths = [bench.image_path(i) for i in range(len(bench.db_images))]
        query = bench.query_path(bench.queries[0])
        config = EncoderConfig.from_preset(
            "temb-demo-512", weights="random", max_side=args.max_side, kmeans_iters=20
        )
        name = f"random-{args.max_side}"
    else:
        images = list_images(args.images)
        if len(images) < 2:
            raise SystemExit(f"{args.images}: fewer than 2 images")
        paths, query = images[: args.n_images], images[min(args.n_images, len(images) - 1)]
        encoder = Encoder.pretrained(args.encoder)
        # Same learned parameters, maps of another size: a speed setting, not a new encoder.
        config = dataclasses.replace(encoder.config, max_side=args.max_side)
        name = f"{args.encoder}-{args.max_side}-{len(paths)}"
    engine_dir = args.workdir / f"engine-{name}"
    if (engine_dir / "encoder.npz").is_file():
        return engine_dir, query
    cache = args.workdir / "features"
    extractor = Extractor.for_config(config, cache=cache)
    if args.seed_cache is not None:  # copy maps computed elsewhere; the seed is only read
        seed = FeatureCache(args.seed_cache)
        for path in paths:
            key = extractor.key(path)
            if key not in extractor.cache and (fmap := seed.get(key)) is not None:
                extractor.cache.put(key, fmap)
    if args.quick:
        encoder = Encoder(config).fit(extractor.maps(learning_images(args.workdir / "demo")))
    else:
        encoder.config = config
    engine = SearchEngine.create(engine_dir, encoder, cache_dir=cache)
    report = engine.add_images(paths)
    print(
        f"built {engine_dir}: {report.added} images indexed, {len(report.failed)} failed",
        flush=True,
    )
    return engine_dir, query


# ===================================================================== server


class Server:
    """``selret serve`` in a subprocess on a free loopback port, with its RSS sampled."""

    def __init__(self, args, engine_dir: Path, batch_size: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-c", SERVER_CODE, "--threads", str(args.threads), "serve",
            str(engine_dir), "--port", str(self.port), "--log-level", "warning",
            "--batch-size", str(batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
        ]  # fmt: skip
        # Its "serving at" line would interleave with the table; warnings and errors still show.
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        deadline = time.monotonic() + args.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server did not answer /health in {args.start_timeout} s")
            time.sleep(0.2)
        threading.Thread(target=self._sample, daemon=True).start()

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                line = next(x for x in f if x.startswith("VmRSS:"))
            return int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            return 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb())

    def reset_peak(self) -> None:
        self.peak_rss_mb = self.rss_mb()

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used (all its threads): on a shared machine a
        fairer cost than wall time, which also measures the neighbours."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=30).json()

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ===================================================================== clients


class Tally:
    """Outcomes of one client population and the seconds each took (thread-safe)."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def add(self, outcome: str, seconds: float = float("nan")) -> None:
        with self.lock:
            self.seconds.setdefault(outcome, []).append(seconds)

    def count(self, outcome: str) -> int:
        return len(self.seconds.get(outcome, []))

    def all_seconds(self) -> np.ndarray:
        values = np.concatenate([np.asarray(v) for v in self.seconds.values()] or [np.zeros(0)])
        return values[np.isfinite(values)]

    def summary(self, window: float) -> dict:
        ms = np.asarray(self.seconds.get("200", [])) * 1000
        done = len(ms)
        statuses = {k: len(v) for k, v in sorted(self.seconds.items())}
        return {
            "completed": done,
            "errors": sum(n for k, n in statuses.items() if k not in ("200", "unfinished")),
            "unfinished": statuses.get("unfinished", 0),
            "statuses": statuses,
            "req_per_s": round(done / window, 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if done else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if done else None,
        }


def searchers(
    url: str, deadline: float, *, image: bytes, name: str, n: int, tally: Tally, top_k=10
):
    """``n`` threads searching with ``image`` until ``deadline`` (perf_counter)."""

    def run():
        with httpx.Client(base_url=url) as client:
            while (left := deadline - time.perf_counter()) > 0:
                start = time.perf_counter()
                try:
                    # A request still queued at the window's end is unfinished, not failed.
                    r = client.post(
                        "/search",
                        files={"image": (name, image, "application/octet-stream")},
                        data={"top_k": str(top_k)},
                        timeout=httpx.Timeout(left + 1.0, connect=10.0),
                    )
                    tally.add(str(r.status_code), time.perf_counter() - start)
                    if r.status_code == 503 and "retry-after" in r.headers:
                        # A well-behaved client waits as told (the queue was full).
                        time.sleep(min(float(r.headers["retry-after"]), max(0.0, left)))
                except httpx.TimeoutException:
                    tally.add("unfinished" if time.perf_counter() >= deadline else "timeout")
                except httpx.TransportError as exc:
                    tally.add(type(exc).__name__)

    return [threading.Thread(target=run, daemon=True) for _ in range(n)]


def slow_loris(url: str, deadline: float, *, n: int, tally: Tally):
    """``n`` threads holding connections open as slowly as they can, alternately by a request
    head that never ends and by an upload of 10 bytes a second; each records how the server
    ended the connection ("408", or "closed") and after how long (seconds)."""
    host = url.removeprefix("http://")
    hostname, port = host.split(":")

    def one(kind: str) -> None:
        start = time.perf_counter()
        try:
            with socket.create_connection((hostname, int(port)), timeout=5) as sock:
                if kind == "head":
                    sock.sendall(f"POST /search HTTP/1.1\r\nHost: {host}\r\n".encode())
                else:
                    sock.sendall((f"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                                  "multipart/form-data; boundary=b\r\nContent-Length: 1000000"
                                  "\r\n\r\n--b\r\n").encode())  # fmt: skip
                sock.settimeout(1.0)
                while time.perf_counter() < deadline:
                    sock.sendall(b"X" if kind == "head" else b"0" * 10)
                    try:
                        data = sock.recv(4096)
                    except TimeoutError:
                        continue
                    outcome = data[9:12].decode() if data.startswith(b"HTTP/1.1") else "closed"
                    tally.add(outcome, time.perf_counter() - start)
                    return
                tally.add("unfinished")
        except OSError:
            tally.add("closed", time.perf_counter() - start)

    def run(i: int):
        kinds = ("head", "body")
        j = i
        while time.perf_counter() < deadline:
            one(kinds[j % 2])
            j += 1

    return [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]


def big_png(megapixels: int) -> bytes:
    """A PNG of ``megapixels`` MP that compresses to little (the decompression-cost attack)."""
    from PIL import Image

    side = int((megapixels * 1_000_000) ** 0.5)
    img = Image.new("RGB", (side, side), (200, 120, 40))
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return out.getvalue()


def window(url: str, window_s: float, *populations) -> None:
    """Run client populations (``functools.partial`` of :func:`searchers` / :func:`slow_loris`)
    against ``url`` for ``window_s`` seconds."""
    deadline = time.perf_counter() + window_s
    threads = [t for make in populations for t in make(url, deadline)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(window_s + 120)


# ===================================================================== runs


def warm_up(args, server: Server, image: bytes, name: str) -> None:
    """A few searches first (the first forward pass of a process pays for kernel selection),
    each waited for: none may still hold a search slot when the measured window starts."""
    with httpx.Client(base_url=server.url, timeout=args.start_timeout) as client:
        for _ in range(args.warmup):
            client.post("/search", files={"image": (name, image)}).raise_for_status()
    server.reset_peak()


def measured(args, server: Server, image: bytes, name: str, *populations) -> dict:
    """Warm up, run ``populations`` for the window; the server's batches and CPU per search.

    CPU per search is all the server's CPU time in the window over the searches it answered
    with 200, so work spent on abusers counts against the searches that got through."""
    warm_up(args, server, image, name)
    before, cpu = server.stats(), server.cpu_seconds()
    window(server.url, args.seconds, *populations)
    cpu = server.cpu_seconds() - cpu
    after = server.stats()
    batches = after["batches"] - before["batches"]
    queries = after["batched_queries"] - before["batched_queries"]
    served = after["searches"] - before["searches"]
    return {
        "mean_batch": round(queries / batches, 2) if batches else None,
        "cpu_s_per_search": round(cpu / served, 3) if served else None,
    }


def run_load(args, engine_dir: Path, image: bytes, name: str) -> list[dict]:
    rows = []
    modes = {"serial": 1, "batched": args.batch_size}
    # Modes alternate at each client count, so that drifting load on a shared machine hits both.
    for clients in args.clients:
        for mode in args.modes:
            server = Server(args, engine_dir, modes[mode])
            tally = Tally()
            try:
                server_side = measured(args, server, image, name,
                                       partial(searchers, image=image, name=name, n=clients, tally=tally))  # fmt: skip
            finally:
                server.stop()
            row = {"mode": mode, "batch_size": modes[mode], "clients": clients,
                   **tally.summary(args.seconds), **server_side,
                   "peak_rss_mb": round(server.peak_rss_mb)}  # fmt: skip
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def run_abuse(args, engine_dir: Path, image: bytes, name: str) -> list[dict]:
    png = big_png(args.png_mp)
    print(f"abuser's PNG: {args.png_mp} MP, {len(png)} bytes", flush=True)
    rows = []
    for scenario in ("clean", "abused"):
        server = Server(args, engine_dir, args.batch_size)
        normal, loris, pngs = Tally(), Tally(), Tally()
        populations = [
            partial(searchers, image=image, name=name, n=args.abuse_clients, tally=normal)
        ]
        if scenario == "abused":
            populations += [
                partial(slow_loris, n=args.slow_loris, tally=loris),
                partial(searchers, image=png, name="bomb.png", n=1, tally=pngs),
            ]
        try:
            server_side = measured(args, server, image, name, *populations)
        finally:
            server.stop()
        row = {"mode": scenario, "batch_size": args.batch_size, "clients": args.abuse_clients,
               **normal.summary(args.seconds), **server_side,
               "peak_rss_mb": round(server.peak_rss_mb)}  # fmt: skip
        if scenario == "abused":
            held = loris.all_seconds()
            ended = loris.summary(args.seconds)["statuses"]
            row["slow_loris"] = {"connections": sum(ended.values()), "ended_by": ended,
                                 "median_held_s": round(float(np.median(held)), 1) if len(held) else None,
                                 "max_held_s": round(float(held.max()), 1) if len(held) else None}  # fmt: skip
            png_ms = pngs.all_seconds() * 1000
            row["png_client"] = {"statuses": pngs.summary(args.seconds)["statuses"],
                                 "median_ms": round(float(np.median(png_ms)), 1) if len(png_ms) else None}  # fmt: skip
        rows.append(row)
        print(format_row(row), flush=True)
        for key in ("slow_loris", "png_client"):
            if key in row:
                print(f"    {key}: {row[key]}", flush=True)
    return rows


HEADER = (f"{'mode':>8} {'batch':>5} {'clients':>7} {'done':>6} {'errors':>6} {'unfin.':>6} "
          f"{'req/s':>7} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>10} {'CPU s/search':>12} "
          f"{'peak RSS MB':>11}")  # fmt: skip


def format_row(r: dict) -> str:
    def cell(value, width: int, spec: str = "") -> str:
        return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"

    return " ".join([
        cell(r["mode"], 8), cell(r["batch_size"], 5), cell(r["clients"], 7),
        cell(r["completed"], 6), cell(r["errors"], 6), cell(r["unfinished"], 6),
        cell(r["req_per_s"], 7, ".3f"), cell(r["p50_ms"], 9, ".1f"), cell(r["p99_ms"], 9, ".1f"),
        cell(r["mean_batch"], 10, ".2f"), cell(r["cpu_s_per_search"], 12, ".3f"),
        cell(r["peak_rss_mb"], 11),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = parser.add_argument
    a(
        "--images",
        type=Path,
        help="folder of images: the first -n are indexed, the next is the query",
    )
    a("-n", "--n-images", type=int, default=8, help="images to index [8]")
    a("--encoder", default=None, help="shipped encoder name [the default one]")
    a("--max-side", type=int, default=None, help="network input size [1024; --quick: 128]")
    a(
        "--seed-cache",
        type=Path,
        help="read (never write) conv maps already computed from this cache",
    )
    a("--quick", action="store_true", help="random weights, 128 px, demo photos, short windows")
    a("--abuse", action="store_true", help="clean vs abused run instead of the load table")
    a("--modes", default="serial,batched", help="serial and/or batched [both]")
    a("--clients", default="1,8,64", help="concurrent clients per run [1,8,64]")
    a("-t", "--seconds", type=float, default=None, help="window per run [60; --quick: 8]")
    a("--warmup", type=int, default=2, help="searches before each measured window [2]")
    a("--batch-size", type=int, default=8, help="batched mode's --batch-size [8]")
    a("--batch-wait-ms", type=float, default=5.0, help="batched mode's --batch-wait-ms [5]")
    a("--threads", type=int, default=1, help="server's --threads (torch, faiss, BLAS) [1]")
    a("--abuse-clients", type=int, default=50, help="normal clients in --abuse [50]")
    a("--slow-loris", type=int, default=5, help="slow-loris clients in --abuse [5]")
    a("--png-mp", type=int, default=64, help="megapixels of the abuser's PNG [64]")
    a("--start-timeout", type=float, default=300.0, help="server start limit (s) [300]")
    a("--json", type=Path, help="also write the rows to this JSON file")
    a("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "selret-http-load",
      help="where engines and their feature cache are kept")  # fmt: skip
    args = parser.parse_args()
    args.max_side = args.max_side or (128 if args.quick else 1024)
    args.seconds = args.seconds or (8.0 if args.quick else 60.0)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.clients = [int(c) for c in args.clients.split(",")]
    if not args.quick and args.images is None:
        parser.error("give --images DIR (or --quick)")
    if args.encoder is None and not args.quick:
        from selret.encoding.pretrained import default_name

        args.encoder = default_name()
    args.workdir.mkdir(parents=True, exist_ok=True)

    engine_dir, query = build_engine(args)
    image = query.read_bytes()
    from PIL import Image

    with Image.open(query) as im:
        size = im.size
    print(f"engine {engine_dir.name}; query {query.name} ({size[0]}x{size[1]}, {len(image)} bytes)"
          f" at max side {args.max_side}; server --threads {args.threads}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; window {args.seconds:g} s")  # fmt: skip
    print(HEADER, flush=True)
    runner = run_abuse if args.abuse else run_load
    rows = runner(args, engine_dir, image, query.name)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
