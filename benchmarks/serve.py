"""``headstart serve`` under load: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients,
batched (``--max-batch 32``) against unbatched (``--max-batch 1``), engine torch against onnx, one run.

usage:
    python benchmarks/serve.py [RUN] [--data DIR] [--requests 200] [--clients 1,8,32] [--engines torch,onnx]
                               [--max-wait-ms 5] [--images 32] [--repeats 1] [--json]

RUN defaults to a head-only run trained here on DATA (../shared/data/ants_bees_train beside this
repository) with its own feature cache; engine ``torch`` is the run's own forward (OpenVINO on CPUs where
it is installed, as the run was trained; the table says which), engine ``onnx`` the exported graph in
ONNX Runtime (``RUN/model.onnx``, exported by the server when missing). Each setting gets a fresh
server process (``-q``, loopback, a free port), a warm-up, then for each client count ``--requests``
requests (at least 4 per client) from that many closed-loop clients (each sends its next request when
its last is answered), each a photo from DATA as the raw body, in one asyncio process with httpx;
with ``--repeats R`` each row is measured R times and the fastest kept.
Client and server share this machine's cores: on a small machine the client's own work is in the figures.

Columns: req/s; p50/p99 latency (ms, client side, connection reuse); the mean batch the server ran
(``/health``); ``x batched``: req/s over the same engine's unbatched row at that client count;
``x torch``: req/s over the torch engine's row with the same batching and clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ants_bees_train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=None, help="run folder (default: train one on --data)")
    parser.add_argument("--data", default=str(DATA), help="photos to send (class folders); training data for the run")
    parser.add_argument("--requests", type=int, default=200, help="requests per (setting, client count)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--engines", default="torch,onnx")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--images", type=int, default=32, help="distinct photos sent, cycled")
    parser.add_argument("--repeats", type=int, default=1, help="measure each row this many times, keep the best "
                                                               "(other work on the machine only slows a row down)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    photos = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        sys.exit(f"no photos under {args.data}; give a folder of images with --data")
    images = [p.read_bytes() for p in photos[:: max(1, len(photos) // args.images)][: args.images]]
    load = os.getloadavg()[0]  # other work on the machine shows in the figures: said next to them
    with tempfile.TemporaryDirectory(prefix="hs-serve-bench-") as tmp:
        run = Path(args.run) if args.run else _train(Path(args.data), Path(tmp))
        env = {**os.environ, "HEADSTART_SERVE_IDLE_EXIT": "600",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if not args.run:
            env["HEADSTART_CACHE_DIR"] = str(Path(tmp) / "cache")
        rows = []
        for engine in args.engines.split(","):
            for max_batch in (32, 1):
                rows += _setting(run, engine, max_batch, args.max_wait_ms, clients, args.requests, images, env,
                                 args.repeats)
    _add_ratios(rows)
    print(_table(rows, run, (load, os.getloadavg()[0])))
    if args.json:
        print(json.dumps(rows, indent=2))


def _train(data: Path, tmp: Path) -> Path:
    import headstart

    print(f"training a head-only run on {data} ...", file=sys.stderr, flush=True)
    headstart.train(data, tmp / "run", select="none", cache_dir=tmp / "cache", progress=False)
    return tmp / "run"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setting(run: Path, engine: str, max_batch: int, max_wait_ms: float, clients: list[int], requests: int,
             images: list[bytes], env: dict[str, str], repeats: int = 1) -> list[dict[str, Any]]:
    """One server process (engine, batching): a row per client count."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "headstart", "serve", str(run), "--port", str(port), "--engine", engine,
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "-q"]
    print(f"{engine}, max batch {max_batch}: starting the server ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            forward = _wait_up(url, server, log)
            asyncio.run(_load(url, 2, 8, images))  # warm-up
            rows = []
            for n in clients:
                tries = []
                for _ in range(repeats):
                    before = httpx.get(f"{url}/health", trust_env=False).json()
                    latencies, seconds, failed = asyncio.run(_load(url, n, max(requests, 4 * n), images))
                    after = httpx.get(f"{url}/health", trust_env=False).json()
                    tries.append(_row(engine, forward, max_batch, n, latencies, seconds, failed, before, after))
                rows.append(max(tries, key=lambda r: r["req_per_s"]))
                print(f"  {n} clients: {rows[-1]['req_per_s']:.1f} req/s", file=sys.stderr, flush=True)
            return rows
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _wait_up(url: str, server: subprocess.Popen, log: Any, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            sys.exit(f"the server exited with {server.returncode}:\n{log.read().decode(errors='replace')[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2, trust_env=False).json()["forward"]
        except httpx.TransportError:
            time.sleep(0.3)
    sys.exit(f"the server did not come up within {timeout:.0f} s")


async def _load(url: str, clients: int, total: int, images: list[bytes]) -> tuple[list[float], float, int]:
    """``total`` requests from ``clients`` closed-loop clients: latencies (ms), wall seconds, failures."""
    latencies: list[float] = []
    failed = 0
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failed
        for i in counter:
            start = time.perf_counter()
            response = await http.post("/predict", content=images[i % len(images)])
            latencies.append(1000 * (time.perf_counter() - start))
            failed += response.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, trust_env=False) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, time.perf_counter() - start, failed


def _row(engine: str, forward: str, max_batch: int, clients: int, latencies: list[float], seconds: float,
         failed: int, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    from headstart.serve import latency_summary

    lat = latency_summary(latencies)
    batches = after["batches"] - before["batches"]
    return {"engine": engine, "forward": forward, "max_batch": max_batch, "clients": clients,
            "requests": len(latencies), "failed": failed, "req_per_s": len(latencies) / seconds,
            "p50_ms": lat["p50"], "p99_ms": lat["p99"],
            "mean_batch": (after["images_scored"] - before["images_scored"]) / batches if batches else 0.0}


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    index = {(r["engine"], r["max_batch"], r["clients"]): r for r in rows}
    for r in rows:
        unbatched = index.get((r["engine"], 1, r["clients"]))
        torch_row = index.get(("torch", r["max_batch"], r["clients"]))
        r["x_batched"] = r["req_per_s"] / unbatched["req_per_s"] if unbatched and r["max_batch"] > 1 else None
        r["x_torch"] = r["req_per_s"] / torch_row["req_per_s"] if torch_row and r["engine"] != "torch" else None


def _table(rows: list[dict[str, Any]], run: Path, load: tuple[float, float]) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"headstart serve on run '{run.name}', {cores} cores (load average {load[0]:.1f} before, {load[1]:.1f} "
             "after), loopback; the client on the same machine",
             *sorted({f"  {r['engine']}: {r['forward']}" for r in rows}), "",
             f"{'engine':<7} {'batch':>5} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'mean batch':>10} {'x batched':>9} {'x torch':>8} {'failed':>6}"]
    for r in rows:
        ratio = [f"{v:.2f}" if v is not None else "-" for v in (r["x_batched"], r["x_torch"])]
        lines.append(f"{r['engine']:<7} {r['max_batch']:>5} {r['clients']:>7} {r['req_per_s']:>8.1f} "
                     f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_batch']:>10.2f} {ratio[0]:>9} "
                     f"{ratio[1]:>8} {r['failed']:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
