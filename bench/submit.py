"""Submit throughput: mediagate's POST /v1/images/generations against pgbench doing the same SQL work.

    python -m bench.submit [--clients 32] [--duration 10] [--web-processes 2]

Needs the local PostgreSQL and Redis (as on the development machines); installs
wrk (Debian) if missing. Both sides do, per request, one transaction with the
debit (conditional UPDATE of the account), the ledger row and the task row, on
accounts picked at random among as many as there are clients. mediagate also
authenticates the key, validates the body, answers JSON and hands the task to
the broker (Redis) through the outbox relay.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import redis

from bench import common

DB = "mediagate_bench_submit"
REDIS_URL = "redis://127.0.0.1:6379/9"
CHARGE = 1_000_000  # the bench catalog's price for local-image 1k, in units
PGBENCH_SQL = f"""\\set aid random(:first, :last)
\\set r random(1, 9223372036854775806)
BEGIN;
UPDATE accounts SET balance = balance - {CHARGE} WHERE id = :aid AND balance - held >= {CHARGE};
INSERT INTO ledger_entries (account_id, kind, amount, reference, note, created_at)
  VALUES (:aid, 'charge', -{CHARGE}, 'media_' || :client_id || '_' || :r, 'image local-image 1k', now());
INSERT INTO image_tasks (id, account_id, api_key_id, model, prompt, size, resolution, n, image_urls,
  webhook_url, charge, status, refunded, attempts, created_at, updated_at)
  VALUES ('media_' || :client_id || '_' || :r, :aid, NULL, 'local-image', 'A futuristic cityscape at sunset',
  '16:9', '1k', 1, '[]', NULL, {CHARGE}, 'pending', false, 0, now(), now());
END;
"""
WRK_LUA = """
local keys = {%s}
local body = '{"model": "local-image", "prompt": "A futuristic cityscape at sunset", '
  .. '"size": "16:9", "resolution": "1k"}'
request = function()
  local key = keys[math.random(#keys)]
  return wrk.format("POST", nil, {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}, body)
end
"""


def pgbench(ids: list[int], clients: int, duration: int, work: Path) -> dict:
    script = work / "submit.sql"
    script.write_text(PGBENCH_SQL)
    exe = common.require_tool("pgbench", "postgresql-client")
    argv = [exe, "-n", "-c", str(clients), "-j", "2", "-T", str(duration), "-f", str(script),
            "-D", f"first={min(ids)}", "-D", f"last={max(ids)}", common.pg_url(DB)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))
    return {"tps": tps, "latency_avg_ms": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--web-processes", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mediagate-bench-"))
    catalog = work / "catalog.toml"
    catalog.write_text('[providers.local]\nformat = "local"\n\n[[models]]\nname = "local-image"\n'
                       'provider = "local"\napi = "image"\nprices = { "1k" = "0.001", "2k" = "0.002", '
                       '"4k" = "0.004" }\n')
    database_url = common.recreate_database(DB)
    ids, keys = common.make_accounts(database_url, args.clients)
    wrk = common.require_tool("wrk", "wrk")

    print(f"pgbench: {args.clients} clients, {args.duration}s ...", file=sys.stderr)
    direct = pgbench(ids, args.clients, args.duration, work)

    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {"MEDIAGATE_DATABASE_URL": database_url, "MEDIAGATE_BROKER_URL": REDIS_URL,
           "MEDIAGATE_CATALOG": str(catalog), "MEDIAGATE_DATA_DIR": str(work / "data")}
    server = common.start([sys.executable, "-m", "app.cli", "serve", "--port", str(args.port),
                           "--workers", str(args.web_processes)], env, work / "serve.log")
    try:
        base = f"http://127.0.0.1:{args.port}"
        common.wait_healthy(base + "/healthz")
        script = work / "submit.lua"
        script.write_text(WRK_LUA % ", ".join(f'"{k}"' for k in keys))
        url = base + "/llm-api/v1/images/generations"
        common.run_wrk(wrk, url, script, args.clients, 3)  # warm-up
        print(f"mediagate: {args.web_processes} web processes, {args.clients} clients, {args.duration}s ...",
              file=sys.stderr)
        through = common.run_wrk(wrk, url, script, args.clients, args.duration)
    finally:
        common.stop(server)
        redis.Redis.from_url(REDIS_URL).flushdb()
        common.drop_database(DB)

    ratio = through["rps"] / direct["tps"]
    result = {"clients": args.clients, "duration_s": args.duration, "web_processes": args.web_processes,
              "pgbench": direct, "mediagate": through, "ratio": round(ratio, 3)}
    print(json.dumps(result, indent=2))
    print(f"\npgbench {direct['tps']:.0f} tx/s | mediagate {through['rps']:.0f} submits/s "
          f"(p50 {through['p50_ms']:.1f} ms, p99 {through['p99_ms']:.1f} ms) | ratio {ratio:.2f}")
    if through["non_2xx"]:
        sys.exit(f"mediagate answered {through['non_2xx']} requests with an error: the run is not valid")


if __name__ == "__main__":
    main()
