"""The `mediagate` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

from sqlalchemy import Engine

from app.core import accounts, keys, ledger, money
from app.core.settings import get_settings

DEV_EMAIL = "dev@localhost"
DEV_BALANCE = "10"


def _engine() -> Engine:
    from app.core.db import make_engine

    return make_engine(get_settings().database_url, pool_size=1)


def cmd_migrate(args: argparse.Namespace) -> None:
    from app.core.migrations import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    print("database is up to date", file=sys.stderr)


def _first_start_account() -> None:
    """On a first start with no accounts: a development account with $10, and its key printed."""
    engine = _engine()
    with engine.begin() as conn:
        if accounts.count(conn):
            return
        account_id = accounts.create(conn, DEV_EMAIL, money.from_usd(DEV_BALANCE))
        new = keys.create(conn, account_id, "development")
    engine.dispose()
    print(f"\nCreated the development account {DEV_EMAIL} with ${DEV_BALANCE}.\nIts API key (shown once):\n\n"
          f"    {new.key}\n", flush=True)


def _worker_argv(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "--loglevel", "INFO", *extra]


def _die_with_parent() -> None:
    """In the embedded worker, before exec: ask Linux to SIGTERM it when `serve` exits, however
    `serve` ends (uvicorn re-raises SIGTERM after its shutdown, past our `finally`)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.http import serving

    settings = get_settings()
    # First, so that every process started below inherits it: uvicorn's workers, the embedded worker.
    open_files = serving.raise_open_file_limit()
    http = serving.http_protocol(serving.limits_for(settings, open_files))
    if not args.no_migrate:
        cmd_migrate(args)
    worker = None
    if settings.embedded_broker:
        _first_start_account()
        # The embedded broker and worker: the same Celery task code, in a child process, with the
        # periodic sweep (-B) beside it. Stops with this command.
        worker = subprocess.Popen(_worker_argv(["-B", "--without-gossip", "--without-mingle",
                                                "--without-heartbeat"]), preexec_fn=_die_with_parent)
    try:
        uvicorn.run("app.http.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                    log_level="info", access_log=args.access_log, proxy_headers=True,
                    http=http)  # type: ignore[arg-type]  # a protocol factory: uvicorn calls it like the class
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()


def cmd_worker(args: argparse.Namespace) -> None:
    os.execv(sys.executable, _worker_argv(args.celery_args))


def cmd_beat(args: argparse.Namespace) -> None:
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "workers.tasks", "beat",
                              "--loglevel", "INFO", *args.celery_args])


def cmd_accounts(args: argparse.Namespace) -> None:
    engine = _engine()
    try:
        # Ask before the transaction opens: on SQLite it holds the write lock while open.
        password_hash = None
        if args.action == "create" and args.password_stdin:
            password_hash = _password_from_stdin()
        elif args.action == "set-password":
            password_hash = _password_prompt(args.email)
        with engine.begin() as conn:
            if args.action == "create":
                account_id = accounts.create(conn, args.email, money.from_usd(args.balance), is_admin=args.admin,
                                             password_hash=password_hash)
                print(json.dumps(accounts.show(conn, account_id), indent=2))
            elif args.action == "set-password":
                account_id = accounts.find(conn, args.email)
                assert password_hash is not None  # prompted for above
                accounts.set_password_hash(conn, account_id, password_hash)
                print(f"password set for {args.email}", file=sys.stderr)
            elif args.action == "set-admin":
                account_id = accounts.find(conn, args.email)
                accounts.set_admin(conn, account_id, not args.off)
                print(json.dumps(accounts.show(conn, account_id), indent=2))
            elif args.action == "topup":
                account_id = accounts.find(conn, args.email)
                ledger.top_up(conn, account_id, money.from_usd(args.amount), note=args.note or "top-up")
                print(json.dumps(accounts.show(conn, account_id), indent=2))
            elif args.action == "show":
                print(json.dumps(accounts.show(conn, accounts.find(conn, args.email)), indent=2))
    except (accounts.AccountError, ValueError) as exc:
        sys.exit(f"mediagate: {exc}")
    finally:
        engine.dispose()


def _password_from_stdin() -> str:
    """The first line of stdin, hashed: for scripts (`printf '%s\\n' "$PW" | mediagate accounts create ...`)."""
    from app.core import passwords

    return passwords.hash_password(sys.stdin.readline().rstrip("\r\n"))


def _password_prompt(email: str) -> str:
    import getpass

    from app.core import passwords

    first = getpass.getpass(f"New dashboard password for {email}: ")
    passwords.check_strength(first)
    if getpass.getpass("Repeat it: ") != first:
        raise ValueError("the passwords differ; nothing changed")
    return passwords.hash_password(first)


def cmd_keys(args: argparse.Namespace) -> None:
    engine = _engine()
    try:
        with engine.begin() as conn:
            if args.action == "create":
                print(keys.create(conn, accounts.find(conn, args.email), args.name).key)
            elif args.action == "revoke":
                count = keys.revoke(conn, args.prefix)
                if not count:
                    sys.exit(f"mediagate: no live key starts with {args.prefix!r}")
                print(f"revoked {count} key(s)", file=sys.stderr)
    except (accounts.AccountError, keys.AmbiguousPrefix) as exc:
        sys.exit(f"mediagate: {exc}")
    finally:
        engine.dispose()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mediagate", description="Self-hosted gateway for image generation and LLM APIs.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the API (and, on the embedded default, a worker)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="web processes")
    s.add_argument("--access-log", action="store_true")
    s.add_argument("--no-migrate", action="store_true",
                   help="don't apply migrations first (when a release step runs `mediagate migrate`)")
    s.set_defaults(func=cmd_serve)

    # Whatever follows `worker` or `beat` goes to celery as written (main() collects it), so that
    # `mediagate worker --concurrency 4` works; a leading `--` is allowed and dropped.
    for name, func, text in (("worker", cmd_worker, "run a Celery worker (arguments go to celery)"),
                             ("beat", cmd_beat, "run the periodic sweep scheduler (arguments go to celery beat)")):
        w = sub.add_parser(name, help=text, allow_abbrev=False,
                           epilog=f"Other arguments go to `celery {name}`; `mediagate {name} -- --help` shows them.")
        w.set_defaults(func=func, celery_args=[])

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    a = sub.add_parser("accounts", help="create, top up and show accounts")
    asub = a.add_subparsers(dest="action", required=True)
    c = asub.add_parser("create")
    c.add_argument("email")
    c.add_argument("--balance", default="0", help="opening balance in USD, e.g. 10 or 2.50")
    c.add_argument("--admin", action="store_true", help="may use the dashboard's admin page")
    c.add_argument("--password-stdin", action="store_true", help="read a dashboard password from stdin's first line")
    sp = asub.add_parser("set-password", help="set a dashboard password (prompts)")
    sp.add_argument("email")
    sa = asub.add_parser("set-admin", help="grant (or with --off, take away) the admin flag")
    sa.add_argument("email")
    sa.add_argument("--off", action="store_true")
    t = asub.add_parser("topup")
    t.add_argument("email")
    t.add_argument("amount", help="USD, e.g. 5 or 0.25")
    t.add_argument("--note", default="")
    sh = asub.add_parser("show")
    sh.add_argument("email")
    a.set_defaults(func=cmd_accounts)

    k = sub.add_parser("keys", help="create and revoke API keys")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create")
    kc.add_argument("email")
    kc.add_argument("--name", default="")
    kr = ksub.add_parser("revoke")
    kr.add_argument("prefix", help="the key's display prefix (llm_xxxxxxxx) or the whole key")
    k.set_defaults(func=cmd_keys)
    return p


def _celery_args(extra: list[str]) -> list[str]:
    """The arguments after `worker` / `beat` that are celery's, without a leading `--`."""
    return extra[1:] if extra[:1] == ["--"] else extra


def main(argv: list[str] | None = None) -> None:
    p = parser()
    # parse_known_args keeps the unknown arguments in order: for worker and beat they are celery's
    # (an argparse REMAINDER positional refuses a first argument that looks like an option, and
    # keeps a `--`); for every other command they are an error, as parse_args would say.
    args, extra = p.parse_known_args(argv)
    if hasattr(args, "celery_args"):  # worker, beat
        args.celery_args = _celery_args(extra)
    elif extra:
        p.error("unrecognized arguments: " + " ".join(extra))
    args.func(args)


if __name__ == "__main__":
    main()
