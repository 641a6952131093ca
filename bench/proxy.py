"""Benchmark the LLM passthrough: direct to a loopback fake upstream vs through mediagate.

    python -m bench.proxy [--seconds 5] [--concurrency 32] [--chunks 20] [--compare-clients]
                          [--driver auto|wrk|aiohttp|all] [--database-url postgresql://user@host/db]
                          [--workers 1,2]

One run starts, each in its own process under uvicorn with uvloop and httptools:
the fake upstream (bench/llm_apps.py, a minimal OpenAI chat endpoint) and
mediagate on a fresh SQLite database (or the PostgreSQL database given, which
it migrates) with one funded account and key: once in one web process
("mediagate", the figure the targets are for) and once for each other count in
`--workers` ("mediagate x2": two web processes, as the Procfile runs it on two
CPUs). It then drives each target with
`--concurrency` clients for `--seconds` per scenario, a non-streaming and a
streaming chat completion, and prints requests per second, p50 / p99 latency
and the ratio through mediagate / direct. `--compare-clients` adds a bare
Starlette passthrough on httpx.AsyncClient and one on aiohttp.ClientSession
(the measurement the proxy's HTTP client was chosen by), and a raw ASGI
passthrough (the floor for any gateway on this stack) on aiohttp, on mediagate's
own client (app/proxy/client.py), and on pyreqwest when it is installed.

The load comes from wrk (C, cheap on CPU) or from a Python aiohttp client
(which takes a core's worth of CPU from the servers, as the Python load
generators do that such comparisons are often made with); `--driver all` runs
both in one go and prints a table for each.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import require_tool

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model":"bench-chat","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64%s}'
UPSTREAMS = {"starlette": "upstream_starlette", "raw": "upstream"}
CATALOG = """
[providers.bench]
format = "openai"
base_url = "{upstream}/v1"
api_key = "sk-bench"

[[models]]
name = "bench-chat"
provider = "bench"
api = "chat"
input_per_mtok = "0.15"
output_per_mtok = "0.60"
max_output_tokens = 4096
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(app: str, port: int, env: dict, *, factory: bool = False, cwd: Path = ROOT,
          workers: int = 1) -> subprocess.Popen:
    """`app` under uvicorn, run from `cwd` (this checkout unless told), in `workers` processes."""
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
            "--http", "httptools", "--log-level", "warning", "--no-access-log", "--backlog", "4096"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = subprocess.Popen(argv + (["--factory"] if factory else []), cwd=cwd, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"bench: {app} did not start on port {port}")


def wait_ready(port: int, workers: int) -> None:
    """Until mediagate answers `/healthz`: with several processes the socket takes connections
    before each process has started its app, so ask often enough to reach each one."""
    deadline, answered = time.monotonic() + 30, 0
    while answered < 10 * workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: mediagate on port {port} is not healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                answered += response.status == 200
        except OSError:
            answered = 0
            time.sleep(0.1)


def stop(procs: list[subprocess.Popen], tmp: Path) -> None:
    """Stop the servers, then remove the run's scratch directory."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live children (mediagate's usage
    writer), on Linux; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


def prepare_gateway(env: dict) -> str:
    """Migrate the database and make a funded account; returns its API key."""
    os.environ.update(env)
    from app.core import accounts, keys, money
    from app.core.db import make_engine
    from app.core.migrations import upgrade
    from app.core.settings import Settings

    settings = Settings.from_env(env)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url, pool_size=1)
    with engine.begin() as conn:
        account_id = accounts.create(conn, f"bench-{os.getpid()}-{time.time_ns()}@example.com",
                                     money.from_usd("1000000"))
        key = keys.create(conn, account_id, "bench").key
    engine.dispose()
    return key


async def drive(url: str, headers: dict, body: bytes, stream: bool, seconds: float, concurrency: int) -> dict:
    import aiohttp  # the `bench` extra; wrk-only runs (and bench.compare) go without it

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = 0.0
        began = float("inf")
        measuring = False

        async def worker():
            nonlocal errors
            while True:
                started = time.perf_counter()
                if started > stop_at and measuring:
                    return
                async with session.post(url, data=body, headers=headers) as response:
                    if stream:
                        async for _ in response.content.iter_any():
                            pass
                    else:
                        await response.read()
                    ok = response.status == 200
                if began <= started <= stop_at:
                    latencies.append(time.perf_counter() - started)
                    errors += not ok

        # One second of warm-up (connections, caches), then the measured window.
        stop_at = time.perf_counter() + 1.0
        warm = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        await asyncio.sleep(1.0)
        measuring = True
        began = time.perf_counter()
        stop_at = began + seconds
        await asyncio.gather(*warm)
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50": latencies[len(latencies) // 2] * 1000,
            "p99": latencies[int(len(latencies) * 0.99)] * 1000, "n": len(latencies), "errors": errors}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%s"
"""
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def drive_wrk(url: str, headers: dict, body: bytes, seconds: float, concurrency: int, tmp: Path) -> dict:
    """The same measurement with wrk (C, one thread): the load generator then costs the servers little CPU."""
    script = tmp / "bench.lua"
    script.write_text(WRK_SCRIPT % (body.decode(), headers["authorization"]))
    base = ["wrk", "-t1", f"-c{concurrency}", "--latency", "-s", str(script)]
    subprocess.run([*base, "-d1s", url], check=True, capture_output=True)  # warm-up
    out = subprocess.run([*base, f"-d{seconds:g}s", url], check=True, capture_output=True, text=True).stdout

    def latency(pct: str) -> float:
        found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if found is None:
            raise SystemExit(f"bench: can't read wrk's output:\n{out}")
        value, unit = found.groups()
        return float(value) * _UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency("50"),
            "p99": latency("99"), "errors": int(errors.group(1)) if errors else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per streamed answer")
    parser.add_argument("--compare-clients", action="store_true")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--workers", default="1",
                        help="mediagate's web processes, one target for each count in this list")
    parser.add_argument("--upstream", choices=tuple(UPSTREAMS), default="starlette",
                        help="the fake upstream: a Starlette app (default) or a bare ASGI callable")
    parser.add_argument("--driver", choices=("auto", "wrk", "aiohttp", "all"), default="auto",
                        help="load generator: wrk when installed (auto), else a Python aiohttp client; "
                             "all: both, one after the other")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mediagate-bench-"))
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    (tmp / "catalog.toml").write_text(CATALOG.format(upstream=upstream))
    env = {**os.environ, "BENCH_CHUNKS": str(args.chunks), "BENCH_UPSTREAM": upstream,
           "MEDIAGATE_DATA_DIR": str(tmp / "data"), "MEDIAGATE_CATALOG": str(tmp / "catalog.toml")}
    env.pop("MEDIAGATE_BROKER_URL", None)
    if args.database_url:
        env["MEDIAGATE_DATABASE_URL"] = args.database_url
    else:
        env.pop("MEDIAGATE_DATABASE_URL", None)
    key = prepare_gateway(env)
    procs = [serve(f"bench.llm_apps:{UPSTREAMS[args.upstream]}", up_port, env, factory=args.upstream == "starlette")]
    targets = {"direct": (up_port, "", procs[0])}
    for workers in sorted({int(n) for n in args.workers.split(",")}):
        # Each count is a server of its own, on the same database and account.
        port = free_port()
        procs.append(serve("app.http.app:create_app", port, env, factory=True, workers=workers))
        wait_ready(port, workers)
        targets["mediagate" if workers == 1 else f"mediagate x{workers}"] = (port, "/llm-api", procs[-1])
    if args.compare_clients:
        names = ["httpx", "aiohttp", "asgi", "asgi_pool"]
        if importlib.util.find_spec("pyreqwest") is not None:
            names.append("asgi_pyreqwest")
        else:
            print("bench: pyreqwest is not installed; bare-asgi-pyreqwest left out (pip install -e '.[bench]')")
        for name in names:
            port = free_port()
            procs.append(serve(f"bench.llm_apps:bare_{name}", port, env, factory=True))
            targets["bare-" + name.replace("_", "-")] = (port, "", procs[-1])
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    if args.driver in ("wrk", "all"):
        require_tool("wrk", "wrk")  # Debian's package, installed when missing
    if args.driver == "all":
        drivers = ["wrk", "aiohttp"]
    else:
        drivers = [args.driver if args.driver != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")]
    runs: dict[str, dict[tuple[str, str], list[dict]]] = {driver: {} for driver in drivers}
    try:
        # Rounds interleave the targets, so a burst of other load on the machine hits them alike;
        # each figure printed is the median over the rounds.
        for driver in drivers:
            for _ in range(args.rounds):
                for mode, extra in (("non-streaming", b""), ("streaming", b',"stream":true')):
                    for name, (port, prefix, proc) in targets.items():
                        url = f"http://127.0.0.1:{port}{prefix}/v1/chat/completions"
                        runs[driver].setdefault((mode, name), []).append(
                            measure(driver, proc.pid, url, headers, BODY % extra, bool(extra), args, tmp))
    finally:
        stop(procs, tmp)
    for driver in drivers:
        report(runs[driver], args, driver)


def measure(driver: str, pid: int, url: str, headers: dict, body: bytes, stream: bool, args, tmp: Path) -> dict:
    cpu_before, began = cpu_seconds(pid), time.perf_counter()
    if driver == "wrk":
        result = drive_wrk(url, headers, body, args.seconds, args.concurrency, tmp)
    else:
        result = asyncio.run(drive(url, headers, body, stream, args.seconds, args.concurrency))
    # The server's CPU per request (warm-up on both sides of the division).
    served = result["rps"] * (time.perf_counter() - began)
    result["cpu_us"] = (cpu_seconds(pid) - cpu_before) / max(served, 1) * 1e6
    return result


def report(runs: dict, args, driver: str) -> None:
    def median(name: str, key: str, mode: str) -> float:
        return statistics.median(r[key] for r in runs[(mode, name)])

    print(f"\nLLM passthrough benchmark: {os.cpu_count()} CPUs, concurrency {args.concurrency}, "
          f"{args.seconds:g} s per scenario, median of {args.rounds} rounds, {args.chunks} chunks per stream, "
          f"{args.upstream} upstream, database {'PostgreSQL' if args.database_url else 'SQLite'}, load from {driver}\n")
    print(f"{'scenario':<15} {'target':<20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'ratio':>6} "
          f"{'server CPU us/req':>18}")
    for mode, name in runs:
        rps = median(name, "rps", mode)
        ratio = rps / median("direct", "rps", mode)
        errors = sum(r["errors"] for r in runs[(mode, name)])
        print(f"{mode:<15} {name:<20} {rps:>8.0f} {median(name, 'p50', mode):>8.1f} "
              f"{median(name, 'p99', mode):>8.1f} {errors:>7} {ratio:>6.2f} {median(name, 'cpu_us', mode):>18.0f}")
    print("\ntargets: mediagate >= 0.35 of direct non-streaming, >= 0.50 streaming")


if __name__ == "__main__":
    main()
