"""Compare mediagate checkouts on the LLM passthrough: interleaved wrk rounds against one fake upstream.

    python -m bench.compare OLD=/tmp/old NEW=. [--stream] [--rounds 3] [--seconds 5] [--concurrency 32]

`git worktree add /tmp/old <commit>` makes a checkout to compare with. Each checkout runs
under uvicorn from its own directory, with this interpreter, on a SQLite database of its
own (made by its own migrations) with one funded account; the fake upstream runs once.
Every round measures direct and then each checkout in turn, starting one checkout further
on each round, so the machine's drift (a third between hours, on the development machine)
and the place in the round fall on all of them alike. It prints
each round and the medians. `bench/proxy.py` measures one checkout against the
yardsticks; this tells whether a change to the code moved it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import require_tool
from bench.proxy import BODY, CATALOG, free_port, measure, serve, stop

# Run inside each checkout, so its own migrations make its database.
PREPARE = "import os; from bench.proxy import prepare_gateway; print(prepare_gateway(dict(os.environ)))"


def factory_of(checkout: Path) -> str:
    """The app factory's import path in a checkout (it moved from app.main to app.http.app)."""
    return "app.http.app:create_app" if (checkout / "app" / "http" / "app.py").exists() else "app.main:create_app"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkouts", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--stream", action="store_true", help="streamed chat completions (default: whole ones)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    checkouts = dict(spec.split("=", 1) for spec in args.checkouts)
    require_tool("wrk", "wrk")

    tmp = Path(tempfile.mkdtemp(prefix="mediagate-compare-"))
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    (tmp / "catalog.toml").write_text(CATALOG.format(upstream=upstream))
    env = {**os.environ, "BENCH_CHUNKS": "20", "BENCH_UPSTREAM": upstream,
           "MEDIAGATE_CATALOG": str(tmp / "catalog.toml")}
    for name in ("MEDIAGATE_BROKER_URL", "MEDIAGATE_DATABASE_URL"):
        env.pop(name, None)
    procs = [serve("bench.llm_apps:upstream_starlette", up_port, env, factory=True)]
    targets = {"direct": (f"{upstream}/v1/chat/completions", procs[0], "Bearer none")}
    try:
        for name, directory in checkouts.items():
            own = {**env, "MEDIAGATE_DATA_DIR": str(tmp / name)}
            key = subprocess.run([sys.executable, "-c", PREPARE], cwd=directory, env=own, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
            port = free_port()
            procs.append(serve(factory_of(Path(directory)), port, own, factory=True, cwd=Path(directory)))
            targets[name] = (f"http://127.0.0.1:{port}/llm-api/v1/chat/completions", procs[-1], f"Bearer {key}")
        body = BODY % (b',"stream":true' if args.stream else b"")
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        names = list(checkouts)
        for round_ in range(args.rounds):
            # Each round starts the checkouts one place further on: the same code measured as
            # the first and the last of a round differed by up to 7% here.
            shift = round_ % len(names)
            for name in ["direct", *names[shift:], *names[:shift]]:
                url, proc, authorization = targets[name]
                run = measure("wrk", proc.pid, url, {"authorization": authorization}, body, args.stream, args, tmp)
                runs[name].append(run)
                print(f"round {round_ + 1} {name:<12} {run['rps']:>8.0f} req/s  p50 {run['p50']:.1f} ms  "
                      f"p99 {run['p99']:.1f} ms  {run['cpu_us']:.0f} us CPU/req  {run['errors']} errors", flush=True)
    finally:
        stop(procs, tmp)

    print(f"\n{'streaming' if args.stream else 'non-streaming'}, concurrency {args.concurrency}, "
          f"{args.seconds:g} s per run, medians of {args.rounds} rounds")
    for name, done in runs.items():
        ratios = [run["rps"] / direct["rps"] for run, direct in zip(done, runs["direct"], strict=True)]
        print(f"{name:<12} {statistics.median(r['rps'] for r in done):>8.0f} req/s  ratio "
              f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)})  "
              f"{statistics.median(r['cpu_us'] for r in done):.0f} us CPU/req")


if __name__ == "__main__":
    main()
