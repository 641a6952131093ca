"""`mediagate accounts create --password-stdin --admin`, `set-password` (prompts), `set-admin`."""

from __future__ import annotations

import io
import json
import secrets

import pytest
from sqlalchemy import select

from app import cli
from app.core import passwords
from app.core.models import Account


def _account(engine, email: str):
    with engine.connect() as conn:
        return conn.execute(select(Account.is_admin, Account.password_hash).where(Account.email == email)).one()


def test_create_admin_with_password_from_stdin(engine, monkeypatch, capsys):
    email = f"admin-{secrets.token_hex(4)}@example.com"
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret password\nignored second line\n"))
    cli.main(["accounts", "create", email, "--admin", "--password-stdin", "--balance", "5"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["is_admin"] is True and shown["balance"] == "5.00000"
    is_admin, stored = _account(engine, email)
    assert is_admin and passwords.verify("s3cret password", stored)


def test_set_password_prompts_twice(engine, make_account, monkeypatch):
    acc = make_account()
    answers = iter(["a fine new password", "a fine new password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    cli.main(["accounts", "set-password", acc.email])
    assert passwords.verify("a fine new password", _account(engine, acc.email).password_hash)


def test_set_password_refuses_a_mismatch_or_a_short_one(engine, make_account, monkeypatch):
    acc = make_account()
    for answers in (["one long password", "another long one"], ["short", "short"]):
        replies = iter(answers)
        monkeypatch.setattr("getpass.getpass", lambda prompt="", replies=replies: next(replies))
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["accounts", "set-password", acc.email])
        assert "mediagate:" in str(exit_info.value)
    assert _account(engine, acc.email).password_hash is None


def test_set_admin_on_and_off(engine, make_account, capsys):
    acc = make_account()
    cli.main(["accounts", "set-admin", acc.email])
    assert _account(engine, acc.email).is_admin
    cli.main(["accounts", "set-admin", acc.email, "--off"])
    assert not _account(engine, acc.email).is_admin
    with pytest.raises(SystemExit):
        cli.main(["accounts", "set-admin", "nobody@example.com"])
