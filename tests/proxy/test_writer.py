"""The usage writer: a child process that settles and records each batch once, whatever happens to it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.core import money
from app.core.models import UsageBatch, UsageRecord, time_ordered_id, utcnow
from app.proxy.recorder import UsageRecorder, WriteFailed
from app.proxy.settlement import Entry, Release, forget_batches, write
from app.proxy.writer import ProcessWriter
from tests.proxy.conftest import money_state, url_of
from tests.servers import pipe

OWNER = "test-writer"
HELD = 5_000  # what each call held


def entry(account_id: int, cost: int = 1_000) -> Entry:
    return Entry(id=time_ordered_id("req_"), account_id=account_id, api_key_id=None, model="test-chat",
                 api_format="chat", stream=False, input_tokens=10, output_tokens=20, cached_tokens=0,
                 reasoning_tokens=0, usage_reported=True, cost=cost, upstream_status=200, latency_ms=3, ttfb_ms=1,
                 client_disconnected=False, created_at=utcnow(), held=HELD, owner=OWNER)


def hold(engine, account_id: int, amount: int) -> None:
    from app.core import ledger

    with engine.begin() as conn:
        assert ledger.hold(conn, account_id, amount, owner=OWNER, expires_at=utcnow() + timedelta(minutes=5))


def records(engine, account_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(UsageRecord)
                            .where(UsageRecord.account_id == account_id)).scalar()


def test_a_batch_written_twice_under_its_id_is_applied_once(make_account, engine):
    account = make_account(balance="1")
    hold(engine, account.id, 2 * HELD)
    batch = [entry(account.id), entry(account.id)]
    batch_id = time_ordered_id("ub_")
    with engine.begin() as conn:
        assert write(conn, batch, batch_id) is True
    after_once = money_state(engine, account.id)
    assert after_once == (money.from_usd("1") - 2_000, 0, money.from_usd("1") - 2_000)
    with engine.begin() as conn:
        assert write(conn, batch, batch_id) is False  # nothing released, charged or recorded again
    assert money_state(engine, account.id) == after_once and records(engine, account.id) == 2


def test_old_batch_ids_are_forgotten(engine):
    old, new = time_ordered_id("ub_"), time_ordered_id("ub_")
    with engine.begin() as conn:
        conn.execute(UsageBatch.__table__.insert(), [{"id": old, "created_at": utcnow() - timedelta(hours=2)},
                                                     {"id": new, "created_at": utcnow()}])
        assert forget_batches(conn) >= 1
        left = set(conn.execute(select(UsageBatch.id).where(UsageBatch.id.in_([old, new]))).scalars())
    assert left == {new}


def test_the_writer_is_a_child_process_that_writes_each_batch(make_account, engine):
    account = make_account(balance="1")
    hold(engine, account.id, 3 * HELD)

    async def scenario():
        writer = ProcessWriter(url_of(engine))
        try:
            await writer.write(time_ordered_id("ub_"), [entry(account.id), entry(account.id, cost=2_500)])
            child = writer.pid
            assert child is not None and child != os.getpid()
            await writer.write(time_ordered_id("ub_"), [entry(account.id, cost=0)])
            assert writer.pid == child  # one child for every batch
        finally:
            await writer.close()
        assert writer.pid is None
        return child

    child = asyncio.run(scenario())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # it exited with the pipe closed
    balance = money.from_usd("1") - 3_500
    assert money_state(engine, account.id) == (balance, 0, balance) and records(engine, account.id) == 3


def test_a_killed_child_is_replaced(make_account, engine, caplog):
    account = make_account(balance="1")
    hold(engine, account.id, 2 * HELD)

    async def scenario():
        writer = ProcessWriter(url_of(engine))
        try:
            await writer.write(time_ordered_id("ub_"), [entry(account.id)])
            first = writer.pid
            os.kill(first, signal.SIGKILL)
            await asyncio.sleep(0.2)
            await writer.write(time_ordered_id("ub_"), [entry(account.id)])
            assert writer.pid not in (None, first)
        finally:
            await writer.close()

    with caplog.at_level(logging.WARNING, logger="app.proxy.writer"):
        asyncio.run(scenario())
    assert "died" in caplog.text
    balance = money.from_usd("1") - 2_000
    assert money_state(engine, account.id) == (balance, 0, balance) and records(engine, account.id) == 2


def test_a_batch_committed_by_a_child_that_died_before_answering_is_applied_once(make_account, engine, tmp_path):
    account = make_account(balance="1")
    hold(engine, account.id, 3 * HELD)
    marker = tmp_path / "died"

    async def scenario():
        writer = ProcessWriter(url_of(engine), command=[sys.executable, "-m", "tests.proxy.faulty_writer", "die",
                                                        str(marker)])
        try:
            # The first child commits the batch and dies; the batch goes again to the next child.
            await writer.write(time_ordered_id("ub_"), [entry(account.id), entry(account.id)])
            await writer.write(time_ordered_id("ub_"), [entry(account.id)])
        finally:
            await writer.close()

    asyncio.run(scenario())
    assert marker.exists()  # a child did die after committing
    balance = money.from_usd("1") - 3_000
    assert money_state(engine, account.id) == (balance, 0, balance) and records(engine, account.id) == 3


def test_a_batch_reported_failed_after_it_was_committed_is_not_written_again(make_account, engine, tmp_path,
                                                                            caplog):
    """A commit can go through and still fail for the client (the connection drops as it
    commits). The recorder sends the batch again under its id before it writes the items
    one by one under new ids, so the batch's claim shows it was written: its release of an
    idle pool's hold, which no record's key would catch, is not applied twice."""
    account = make_account(balance="1")
    in_flight = 4_000  # held by another call, still running: it must stay held
    hold(engine, account.id, 3 * HELD + 7_000 + in_flight)
    marker = tmp_path / "failed"

    async def scenario():
        writer = ProcessWriter(url_of(engine), command=[sys.executable, "-m", "tests.proxy.faulty_writer", "fail",
                                                        str(marker)])
        recorder = UsageRecorder(writer)
        recorder.start()
        for item in (entry(account.id), Release(account.id, 7_000, owner=OWNER), entry(account.id), entry(account.id)):
            recorder.record(item)
        await recorder.stop()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert marker.exists()  # the first answer did say the batch failed
    assert "could not write" not in caplog.text
    balance = money.from_usd("1") - 3_000
    assert money_state(engine, account.id) == (balance, in_flight, balance) and records(engine, account.id) == 3


def test_a_batch_the_database_refuses_fails_whole_and_the_recorder_writes_the_rest(make_account, engine):
    account = make_account(balance="1")
    hold(engine, account.id, 3 * HELD)
    bad = entry(account.id)
    bad.api_key_id = 2**31 - 1  # no such key: the foreign key refuses the record

    async def scenario():
        writer = ProcessWriter(url_of(engine))
        try:
            with pytest.raises(WriteFailed) as failed:
                await writer.write(time_ordered_id("ub_"), [entry(account.id), bad])
            assert failed.value.refused  # a constraint: sending it again would not help
            assert money_state(engine, account.id)[1] == 3 * HELD  # rolled back: nothing released
            recorder = UsageRecorder(writer)
            recorder.start()
            for item in (entry(account.id), bad, entry(account.id)):
                recorder.record(item)
            await recorder.stop()  # writes the batch; it fails, so each item is written alone
        finally:
            await writer.close()

    asyncio.run(scenario())
    balance = money.from_usd("1") - 2_000
    # The bad record's hold stays held (the process's hold row is released at its stop or expiry).
    assert money_state(engine, account.id) == (balance, HELD, balance) and records(engine, account.id) == 2


def test_releases_without_calls_go_through_the_writer(make_account, engine):
    account = make_account(balance="1")
    hold(engine, account.id, 7_000)

    async def scenario():
        recorder = UsageRecorder(ProcessWriter(url_of(engine)))
        recorder.start()
        recorder.record(Release(account.id, 7_000, owner=OWNER))
        await recorder.stop()

    asyncio.run(scenario())
    assert money_state(engine, account.id) == (money.from_usd("1"), 0, money.from_usd("1"))


class _Writer:
    """A writer within the test's own process, for the recorder alone: each test says how it writes."""

    async def start(self) -> None:
        pass

    async def write(self, batch_id: str, items: list) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _GatedWriter(_Writer):
    """A writer that writes nothing until let go, then fails or succeeds as told."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.fail = False

    async def write(self, batch_id: str, items: list) -> None:
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("the writer was lost")


def test_health_says_when_the_writer_stalls_or_fails():
    async def scenario():
        writer = _GatedWriter()
        recorder = UsageRecorder(writer)
        recorder.start()
        assert recorder.health(stalled_after=0.05) == "ok"  # nothing waiting
        recorder.record(entry(1))
        assert recorder.health(stalled_after=0.05) == "ok"
        await asyncio.sleep(0.1)
        assert recorder.health(stalled_after=0.05).startswith("stalled: 1 calls waiting")
        writer.gate.set()
        await recorder.flush()
        assert recorder.health(stalled_after=0.05) == "ok"

        writer.fail = True
        recorder.record(entry(1))
        await recorder.flush()
        assert recorder.health(stalled_after=5).startswith("failing:")
        assert recorder.health(stalled_after=0.0) == "ok"  # said for a while, not for good
        writer.fail = False
        recorder.record(entry(1))
        await recorder.flush()
        assert recorder.health(stalled_after=5) == "ok"  # a batch written again
        await recorder.stop()

    asyncio.run(scenario())


def test_a_writer_lost_while_items_are_written_one_by_one_gives_up_the_rest_at_once():
    """Each lost write has already been through the writer's resends (seconds each): the items
    after it are not sent to wait through the same, one by one."""

    class RefusesBatchesThenIsLost(_Writer):
        def __init__(self):
            self.sent: list[int] = []

        async def write(self, batch_id: str, items: list) -> None:
            self.sent.append(len(items))
            if len(items) > 1:
                raise WriteFailed("refused", refused=True)
            raise RuntimeError("the writer was lost")

    async def scenario():
        writer = RefusesBatchesThenIsLost()
        recorder = UsageRecorder(writer)
        recorder.start()
        for _ in range(3):
            recorder.record(entry(1))
        await recorder.flush()
        assert recorder.health().startswith("failing:")
        await recorder.stop()
        return writer.sent

    assert asyncio.run(scenario()) == [3, 1]  # the batch (refused), then the first item only


def test_healthz_is_degraded_while_the_usage_writer_fails(llm_upstream, make_account, engine):
    from dataclasses import replace

    from starlette.testclient import TestClient

    from app.core.models import ApiKey
    from app.core.settings import get_settings
    from app.http.app import create_app
    from tests.proxy.conftest import usage_rows

    account = make_account()
    call = {"model": "gpt-4o", "messages": [{"role": "user", "content": "[in:7] [out:3]"}]}
    # The key must stay cached from the first call to the second, however slow the machine.
    settings = replace(get_settings(), key_cache_seconds=60.0)
    with TestClient(create_app(settings)) as client:  # an app of its own: its failure can't spill into other tests
        assert client.post("/v1/chat/completions", headers=account.headers, json=call).status_code == 200
        usage_rows(engine, account.id)
        assert client.get("/healthz").json()["usage_writer"] == "ok"
        # The key is cached, so calls go on; its row is gone, so the database refuses their records.
        with engine.begin() as conn:
            conn.execute(ApiKey.__table__.delete().where(ApiKey.account_id == account.id))
        assert client.post("/v1/chat/completions", headers=account.headers, json=call).status_code == 200
        deadline = time.monotonic() + 15
        while (health := client.get("/healthz")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health.status_code == 503
        assert health.json()["status"] == "degraded" and health.json()["usage_writer"].startswith("failing:")
        assert health.json()["database"] == "ok"


def test_a_flush_under_steady_traffic_ends_with_the_next_batch():
    """What is recorded after a flush began is not waited for: under steady traffic the queue
    is never empty, and a listing that flushes first must not wait for its timeout."""

    class SlowWriter(_Writer):
        def __init__(self):
            self.written: list[str] = []

        async def write(self, batch_id: str, items: list) -> None:
            await asyncio.sleep(0.02)
            self.written += [item.id for item in items]

    async def scenario():
        writer = SlowWriter()
        recorder = UsageRecorder(writer)
        recorder.start()

        recorded: list[str] = []

        async def traffic():
            while True:
                item = entry(1)
                recorder.record(item)
                recorded.append(item.id)
                await asyncio.sleep(0.002)

        feeding = asyncio.create_task(traffic())
        await asyncio.sleep(0.3)
        before = list(recorded)
        started = time.monotonic()
        await recorder.flush(timeout=5)
        took, written = time.monotonic() - started, set(writer.written)
        feeding.cancel()
        await recorder.stop()
        assert before and set(before) <= written  # what was recorded before the flush is written
        assert took < 1.0, f"the flush waited {took:.1f} s"

    asyncio.run(scenario())


class _FailingWriter(_Writer):
    """Fails each batch it is sent `failures` times as the database does when it is away
    (forever if None), and refuses any batch holding an item of `refused_ids`."""

    def __init__(self, failures: int | None, refused_ids: frozenset = frozenset()):
        self.failures, self.refused_ids = failures, refused_ids
        self.sent: list[tuple[str, int]] = []
        self.written: list[str] = []

    async def write(self, batch_id: str, items: list) -> None:
        self.sent.append((batch_id, len(items)))
        if any(item.id in self.refused_ids for item in items):
            raise WriteFailed("IntegrityError('refused')", refused=True)
        if self.failures is None or sum(sent == batch_id for sent, _ in self.sent) <= self.failures:
            raise WriteFailed("OperationalError('the server closed the connection')")
        self.written += [item.id for item in items]


def _recorded(writer: _Writer, items: list, **patience) -> UsageRecorder:
    async def scenario():
        recorder = UsageRecorder(writer, **patience)
        recorder.start()
        for item in items:
            recorder.record(item)
        await recorder.stop()
        return recorder

    return asyncio.run(scenario())


def test_a_batch_goes_again_under_its_id_while_the_database_is_away():
    items = [entry(1) for _ in range(3)]
    writer = _FailingWriter(failures=6)  # more than the old five tries per item allowed
    recorder = _recorded(writer, items, max_pause=0.2)
    assert writer.written == [item.id for item in items]  # nothing given up, nothing split
    assert len({batch_id for batch_id, _ in writer.sent}) == 1 and len(writer.sent) == 7
    assert recorder.health() == "ok"


def test_what_the_database_refuses_is_given_up_at_once_and_the_rest_written():
    items = [entry(1) for _ in range(3)]
    writer = _FailingWriter(failures=0, refused_ids=frozenset({items[1].id}))
    recorder = _recorded(writer, items)
    assert writer.written == [items[0].id, items[2].id]
    # The batch once, then each item once under its own id: a refusal is not tried again.
    assert [size for _, size in writer.sent] == [3, 1, 1, 1]
    assert recorder.health().startswith("failing:")


def test_at_stop_a_batch_the_database_keeps_failing_is_given_up_in_time(caplog):
    writer = _FailingWriter(failures=None)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        _recorded(writer, [entry(1)], stop_patience=0.5, max_pause=0.1)
    assert time.monotonic() - started < 3 and writer.written == []
    assert "the database failing too long" in caplog.text


def test_a_batch_is_given_up_before_its_id_could_be_forgotten(monkeypatch, caplog):
    # Sent again past KEEP_BATCH_IDS, a batch whose commit went through unreported would be
    # applied twice: it is given up after RESEND_FOR, half that, even while the process runs.
    from app.proxy import recorder as recorder_module

    assert recorder_module.RESEND_FOR < recorder_module.KEEP_BATCH_IDS.total_seconds()
    writer = _FailingWriter(failures=None)

    async def scenario():
        recorder = UsageRecorder(writer, resend_for=0.5, max_pause=0.1)
        recorder.start()
        recorder.record(entry(1))
        started = time.monotonic()
        await recorder.flush(timeout=5)  # returns once the batch is done with: here, given up
        took = time.monotonic() - started
        await recorder.stop()
        return took

    with caplog.at_level(logging.ERROR):
        assert asyncio.run(scenario()) < 3
    assert writer.written == [] and "the database failing too long" in caplog.text


def test_the_child_tells_an_unreachable_database_from_a_refusal():
    async def scenario():
        writer = ProcessWriter("postgresql+psycopg://nobody@127.0.0.1:1/nothing")
        try:
            with pytest.raises(WriteFailed) as failed:
                await writer.write(time_ordered_id("ub_"), [entry(1)])
        finally:
            await writer.close()
        return failed.value

    failure = asyncio.run(scenario())
    assert not failure.refused and "OperationalError" in str(failure)


@pytest.mark.skipif(not os.environ.get("MEDIAGATE_TEST_DATABASE_URL"), reason="a PostgreSQL server to cut off")
def test_calls_recorded_while_postgresql_is_unreachable_are_written_once_it_is_back(make_account, engine):
    """The writer reaches PostgreSQL through a loopback relay the test cuts and restores."""
    account = make_account(balance="1")
    hold(engine, account.id, 3 * HELD)
    url = engine.url

    async def scenario():
        up = False
        pipes: list[asyncio.StreamWriter] = []

        async def relay(client_reader, client_writer):
            if not up:
                client_writer.close()
                return
            server_reader, server_writer = await asyncio.open_connection(url.host, url.port or 5432)
            pipes.extend((client_writer, server_writer))
            await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        writer = ProcessWriter(url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False))
        recorder = UsageRecorder(writer, max_pause=0.2)
        recorder.start()
        for _ in range(3):
            recorder.record(entry(account.id))
        deadline = time.monotonic() + 10
        while not recorder.health().startswith("failing:") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert recorder.health().startswith("failing:")  # tried, and PostgreSQL is away
        assert records(engine, account.id) == 0
        up = True
        await recorder.flush(timeout=10)
        await recorder.stop()
        server.close()
        for pipe_writer in pipes:
            pipe_writer.close()
        return recorder.health()

    assert asyncio.run(scenario()) == "ok"
    balance = money.from_usd("1") - 3_000
    assert records(engine, account.id) == 3 and money_state(engine, account.id) == (balance, 0, balance)
