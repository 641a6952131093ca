"""Shared bench helpers: a scratch PostgreSQL database, accounts with keys, servers, wrk."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_url(database: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + database


def recreate_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg_url(name).replace("postgresql://", "postgresql+psycopg://")


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_accounts(database_url: str, count: int, balance_usd: str = "1000000") -> tuple[list[int], list[str]]:
    from app.core import accounts, keys, money
    from app.core.db import make_engine
    from app.core.migrations import upgrade

    upgrade(database_url)
    engine = make_engine(database_url, pool_size=1)
    ids, secrets = [], []
    with engine.begin() as conn:
        for i in range(count):
            account_id = accounts.create(conn, f"bench-{i}@example.com", money.from_usd(balance_usd))
            ids.append(account_id)
            secrets.append(keys.create(conn, account_id, "bench").key)
    engine.dispose()
    return ids, secrets


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    print(f"installing {package} (apt-get) for the benchmark...", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", package], check=False, capture_output=True)
    path = shutil.which(name)
    if not path:
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=True, capture_output=True)
        path = shutil.which(name)
    return path


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(output: str) -> dict:
    """Requests per second, p50 and p99 latency (ms) and the non-2xx count from `wrk --latency`."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    lat = {p: _ms(*re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", output).groups()) for p in ("50", "99")}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:.*", output)
    return {"rps": rps, "p50_ms": lat["50"], "p99_ms": lat["99"], "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(0) if errors else ""}


def run_wrk(wrk: str, url: str, script: Path, connections: int, duration: int, threads: int = 2) -> dict:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)
