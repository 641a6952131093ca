"""The `mediagate` command: account and key management, and what `worker` and `beat` pass to Celery."""

import json
import os
import sys
import uuid

import pytest

from app.cli import main


def run(capsys, *argv) -> tuple[str, str]:
    main(list(argv))
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_accounts_create_topup_show_and_keys(capsys, client):
    email = f"cli-{uuid.uuid4().hex[:8]}@example.com"
    out, _ = run(capsys, "accounts", "create", email, "--balance", "2.5")
    assert json.loads(out)["balance"] == "2.50000"
    out, _ = run(capsys, "accounts", "topup", email, "0.125")
    assert json.loads(out)["balance"] == "2.62500"
    out, _ = run(capsys, "keys", "create", email, "--name", "ci")
    key = out.strip()
    assert key.startswith("llm_") and "\n" not in key  # only the key: scripts capture it
    assert client.get("/v1/balance", headers={"Authorization": f"Bearer {key}"}).json()["balance"] == "2.62500"
    shown = json.loads(run(capsys, "accounts", "show", email)[0])
    assert shown["email"] == email and shown["keys"][0]["name"] == "ci" and not shown["keys"][0]["revoked"]
    run(capsys, "keys", "revoke", key[:12])
    assert json.loads(run(capsys, "accounts", "show", email)[0])["keys"][0]["revoked"] is True


def test_cli_errors_are_messages_not_tracebacks(capsys):
    with pytest.raises(SystemExit, match="no account for nobody@example.com"):
        main(["accounts", "topup", "nobody@example.com", "1"])
    with pytest.raises(SystemExit, match="exists already"):
        email = f"dup-{uuid.uuid4().hex[:8]}@example.com"
        main(["accounts", "create", email])
        main(["accounts", "create", email])
    with pytest.raises(SystemExit, match="no live key"):
        main(["keys", "revoke", "llm_nothing0"])
    with pytest.raises(SystemExit, match="float|amount"):
        main(["accounts", "create", f"x-{uuid.uuid4().hex[:6]}@example.com", "--balance", "lots"])


def test_revoking_by_a_prefix_two_keys_share_is_refused(capsys, engine, make_account):
    from sqlalchemy import update

    from app.core.models import ApiKey

    first, second = make_account(), make_account()
    with engine.begin() as conn:  # force the (astronomically unlikely) collision of display prefixes
        conn.execute(update(ApiKey).where(ApiKey.account_id.in_([first.id, second.id]))
                     .values(prefix="llm_collide0"))
    with pytest.raises(SystemExit, match="2 live keys start with"):
        main(["keys", "revoke", "llm_collide0"])
    run(capsys, "keys", "revoke", first.key)  # the whole key is unambiguous
    with pytest.raises(SystemExit, match="no live key"):
        main(["keys", "revoke", first.key])


@pytest.mark.parametrize("argv", [["--concurrency", "4", "-Q", "images"],
                                  ["--", "--concurrency", "4", "-Q", "images"]])
@pytest.mark.parametrize("command", ["worker", "beat"])
def test_worker_and_beat_pass_their_arguments_to_celery(monkeypatch: pytest.MonkeyPatch, command: str,
                                                        argv: list[str]) -> None:
    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, args: execs.append(args))  # no Celery is started
    main([command, *argv])
    (args,) = execs
    assert args[:6] == [sys.executable, "-m", "celery", "-A", "workers.tasks", command]
    assert args[6:] == ["--loglevel", "INFO", "--concurrency", "4", "-Q", "images"]  # no literal `--`
    execs.clear()
    main([command])
    assert execs == [[sys.executable, "-m", "celery", "-A", "workers.tasks", command, "--loglevel", "INFO"]]


def test_other_commands_still_refuse_unknown_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--concurrency", "4"])
    assert exc.value.code == 2 and "unrecognized arguments: --concurrency 4" in capsys.readouterr().err
