"""The ledger: the only code that moves money; balance always equals the sum of the ledger."""

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.core import accounts, ledger, money
from app.core.models import LedgerEntry, LLMHold, utcnow


@pytest.fixture
def funded(engine):
    with engine.begin() as conn:
        return accounts.create(conn, f"ledger-{uuid.uuid4().hex}@example.com", money.from_usd("1"))


def test_charge_refuses_to_overdraw_and_writes_nothing(engine, funded):
    with engine.begin() as conn:
        with pytest.raises(ledger.InsufficientBalance):
            ledger.charge(conn, funded, money.from_usd("1.00001"), reference="t1")
        ledger.charge(conn, funded, money.from_usd("1"), reference="t2")
        assert ledger.balance(conn, funded) == 0 == ledger.ledger_sum(conn, funded)


def test_refund_happens_at_most_once_per_reference(engine, funded):
    with engine.begin() as conn:
        ledger.charge(conn, funded, 500, reference="media_x")
        assert ledger.refund(conn, funded, 500, reference="media_x") is True
        assert ledger.refund(conn, funded, 500, reference="media_x") is False
        kinds = conn.execute(select(LedgerEntry.kind).where(LedgerEntry.account_id == funded)).scalars().all()
        assert kinds.count("refund") == 1
        assert ledger.balance(conn, funded) == money.from_usd("1") == ledger.ledger_sum(conn, funded)


def test_hold_reserves_and_settle_charges_never_below_zero(engine, funded):
    one = money.from_usd("1")
    lease = {"owner": "test-process", "expires_at": utcnow() + timedelta(seconds=60)}
    with engine.begin() as conn:
        assert ledger.hold(conn, funded, one - 10, **lease)
        assert not ledger.hold(conn, funded, 11, **lease)  # only 10 units are free
        charged = ledger.settle(conn, funded, one - 10, one * 2, owner="test-process", reference="req_1")
        assert charged == one and ledger.balance(conn, funded) == 0 == ledger.ledger_sum(conn, funded)


def test_a_hold_block_takes_at_most_a_share_of_the_free_balance(engine, funded):
    lease = {"owner": "p", "expires_at": utcnow() + timedelta(seconds=60)}
    free = money.from_usd("1")
    with engine.begin() as conn:
        assert ledger.hold(conn, funded, 10, **lease) == 10  # no block asked: exactly the amount
        free -= 10
        assert ledger.hold(conn, funded, 10, up_to=50, **lease) == 50  # a small block fits
        free -= 50
        assert ledger.hold(conn, funded, 10, up_to=free, share=4, **lease) == free // 4
        free -= free // 4
        assert ledger.hold(conn, funded, free - 1, up_to=free, share=4, **lease) == free - 1  # the need comes first
        assert ledger.hold(conn, funded, 2, up_to=100, **lease) == 0  # one unit is free
        assert ledger.hold(conn, funded, 1, up_to=100, **lease) == 1
        assert conn.execute(select(LLMHold.amount).where(LLMHold.account_id == funded)).scalar() == money.from_usd("1")


def test_top_up_must_be_positive(engine, funded):
    with engine.begin() as conn:
        with pytest.raises(ValueError):
            ledger.top_up(conn, funded, 0)
