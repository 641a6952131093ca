"""Nothing lost under crashes: a few hundred tasks against a backend that fails at random, while
Celery workers are SIGKILLed and the Redis broker is flushed and its connections dropped.

Afterwards, for every account and task: balance = top-ups - charges of tasks not refunded, the
balance equals its ledger, every task ended in exactly one terminal state with one charge and at
most one refund, and every task's webhook was delivered, signed, with the final state.

Real PostgreSQL, Redis and worker processes only (integration mode). The run has its own
database, broker queue, workers and beat, with short leases, sweep and webhook schedule.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections import defaultdict
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import INTEGRATION, REDIS_URL, ROOT, RUN_DIR, TEST_DB_NAME, Worker, _pg_url_for
from tests.servers import ThreadedServer

pytestmark = pytest.mark.skipif(
    not INTEGRATION, reason="the chaos test needs real PostgreSQL, Redis and worker processes: set "
                            "MEDIAGATE_TEST_DATABASE_URL and MEDIAGATE_TEST_REDIS_URL (CI does)")

TASKS = 300
ACCOUNTS = 4
SEED = int(os.environ.get("MEDIAGATE_CHAOS_SEED") or random.randrange(1 << 30))
TERMINAL = {"completed", "failed", "canceled"}


class ChaosReceiver:
    """Verifies every delivery with the Standard Webhooks library; fails at random (500s and
    answers slower than the timeout) the first few times it sees an event, then accepts it."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.secrets: dict[str, str] = {}
        self.delivered: dict[str, list[dict]] = defaultdict(list)  # task_id -> accepted events
        self.ids: dict[str, set[str]] = defaultdict(set)  # task_id -> webhook-ids seen
        self.bad_signatures = 0
        self.refused = 0
        self._seen: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/hooks/{account}", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        import asyncio

        body = await request.body()
        try:
            event = Webhook(self.secrets[request.path_params["account"]]).verify(body, dict(request.headers))
        except (WebhookVerificationError, KeyError):
            with self._lock:
                self.bad_signatures += 1
            return Response(status_code=400)
        msg_id = request.headers["webhook-id"]
        with self._lock:
            self._seen[msg_id] += 1
            roll = self.rng.random() if self._seen[msg_id] <= 3 else 1.0
        if roll < 0.25:
            with self._lock:
                self.refused += 1
            return Response(status_code=self.rng.choice([500, 502, 503, 429, 404]))
        if roll < 0.30:
            await asyncio.sleep(2.5)  # over the 2 s timeout: the attempt fails, whatever we answer
            return Response(status_code=200)
        with self._lock:
            task_id = event["data"]["task_id"]
            self.delivered[task_id].append(event)
            self.ids[task_id].add(msg_id)
        return Response(status_code=204)


def _prompt(rng: random.Random, i: int) -> str:
    """A prompt whose markers make the fake upstream succeed, fail (transiently or not), or take long."""
    roll = rng.random()
    marker = ("" if roll < 0.40 else "[flaky:1]" if roll < 0.55 else "[flaky:9]" if roll < 0.62
              else "[status:500]" if roll < 0.70 else "[status:400]" if roll < 0.78
              else "[noimage]" if roll < 0.82 else f"[sleep:{rng.choice([1, 1.5, 2])}]")
    # [dims:32x32]: the fake upstream (in this process) answers with a tiny image, so its CPU does not
    # starve the gateway sharing this process; the worker still scales it to the full 1k size.
    return f"chaos {SEED} {i} [dims:32x32] {marker}"


@pytest.fixture
def chaos_db():
    import psycopg

    from app.core.migrations import upgrade

    name = f"{TEST_DB_NAME}_chaos"
    admin = _pg_url_for("postgres").replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _pg_url_for(name)
    upgrade(url)
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _broker_outage(redis_client, db: int) -> None:
    """As if Redis restarted empty: every message gone, every client of our database disconnected."""
    redis_client.flushdb()
    me = redis_client.client_id()
    for client in redis_client.client_list():
        if int(client.get("db", -1)) == db and int(client["id"]) != me:
            redis_client.client_kill_filter(_id=int(client["id"]))


@pytest.mark.timeout(170)
def test_nothing_is_lost_under_crashes(chaos_db, fake_images):
    import redis

    from app.core import accounts, keys, ledger, money
    from app.core.db import make_engine
    from app.core.models import ImageTask, LedgerEntry, WebhookDelivery
    from app.core.settings import Settings
    from app.http.app import create_app

    rng = random.Random(SEED)
    print(f"chaos seed {SEED} (MEDIAGATE_CHAOS_SEED={SEED} replays the workload)")
    queue = f"chaos-{secrets.token_hex(4)}"
    data_dir = RUN_DIR / "chaos"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "MEDIAGATE_DATABASE_URL": chaos_db, "MEDIAGATE_BROKER_URL": REDIS_URL, "MEDIAGATE_QUEUE": queue,
        "MEDIAGATE_DATA_DIR": str(data_dir), "MEDIAGATE_WORKER_CONCURRENCY": "60",
        "MEDIAGATE_TASK_LEASE_SECONDS": "4", "MEDIAGATE_TASK_MAX_ATTEMPTS": "3",
        "MEDIAGATE_SWEEP_INTERVAL": "1", "MEDIAGATE_REDISPATCH_AFTER": "3",
        "MEDIAGATE_BACKEND_RETRIES": "2", "MEDIAGATE_BACKEND_RETRY_BACKOFF": "0.05",
        "MEDIAGATE_WEBHOOK_SCHEDULE": "0.2,0.5,1,1,2,2,3", "MEDIAGATE_WEBHOOK_TIMEOUT": "2",
        "MEDIAGATE_DB_POOL_SIZE": "3",  # five worker processes and a gateway, beside the rest of the suite
    }
    settings = Settings.from_env({**os.environ, **env})
    engine = make_engine(chaos_db, pool_size=5)
    broker = redis.Redis.from_url(REDIS_URL)
    redis_db = int(urlsplit(REDIS_URL).path.strip("/") or 0)
    receiver = ChaosReceiver(random.Random(SEED + 1))

    workers: list[Worker] = []
    starters: list[threading.Thread] = []

    def start_worker(n: int) -> Worker:
        worker = Worker(data_dir / f"worker-{n}.log", env=env).start()
        workers.append(worker)
        return worker

    beat_log = open(data_dir / "beat.log", "ab")
    beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.tasks", "beat", "--loglevel",
                             "INFO", "--schedule", str(data_dir / "beat-schedule")], cwd=ROOT,
                            env={**os.environ, **env}, stdout=beat_log, stderr=subprocess.STDOUT)
    try:
        starters.extend(threading.Thread(target=start_worker, args=(n,), daemon=True) for n in range(3))
        for t in starters:
            t.start()
        with ThreadedServer(receiver.app, limit_concurrency=1000) as hooks, \
                ThreadedServer(create_app(settings), limit_concurrency=1000) as gateway, \
                httpx.Client(base_url=gateway.url, timeout=30) as client:
            for t in starters:
                t.join()
            assert len(workers) == 3, "a worker did not start"
            people = []
            for n in range(ACCOUNTS):
                with engine.begin() as conn:
                    account_id = accounts.create(conn, f"chaos{n}-{SEED}@example.com", money.from_usd("5"))
                    key = keys.create(conn, account_id, "chaos").key
                headers = {"Authorization": f"Bearer {key}"}
                receiver.secrets[str(account_id)] = client.get("/v1/webhooks/secret", headers=headers).json()["secret"]
                people.append((account_id, headers))

            # The sabotage follows the submissions: at 1/4 a worker is killed, at 1/2 the broker
            # "restarts" empty, at 3/4 another worker is killed, at the end the broker is flushed.
            progress = [threading.Event() for _ in range(4)]

            def chaos():
                progress[0].wait()
                workers[0].stop(kill=True)
                replacements = [threading.Thread(target=start_worker, args=(3,), daemon=True)]
                replacements[0].start()
                progress[1].wait()
                _broker_outage(broker, redis_db)
                progress[2].wait()
                workers[1].stop(kill=True)
                replacements.append(threading.Thread(target=start_worker, args=(4,), daemon=True))
                replacements[1].start()
                progress[3].wait()
                time.sleep(0.5)
                broker.flushdb()
                for t in replacements:
                    t.join()

            saboteur = threading.Thread(target=chaos, daemon=True)  # a failed run must not hang the exit
            saboteur.start()
            task_ids: dict[str, int] = {}
            counts = {"replays": 0, "cancels": 0}
            jobs = []
            for i in range(TASKS):
                account_id, headers = people[i % ACCOUNTS]
                body = {"model": rng.choice(["gpt-image-2", "gemini-image"]),
                        "prompt": _prompt(rng, i), "webhook_url": f"{hooks.url}/hooks/{account_id}"}
                jobs.append((account_id, headers, body, f"k{i}" if rng.random() < 0.2 else None,
                             rng.random() < 0.05))

            async def submit_all():
                done = 0
                gate = asyncio.Semaphore(12)

                async def job(http, account_id, headers, body, key, cancel):
                    nonlocal done
                    async with gate:
                        extra = {"Idempotency-Key": key} if key else {}
                        r = await http.post("/v1/images/generations", headers={**headers, **extra}, json=body)
                        assert r.status_code == 202, r.text
                        task_id = r.json()["task_id"]
                        task_ids[task_id] = account_id
                        if key:  # the client retries: same answer, no second task or charge
                            again = await http.post("/v1/images/generations", headers={**headers, **extra},
                                                    json=body)
                            assert again.json()["task_id"] == task_id
                            counts["replays"] += 1
                        if cancel:
                            c = await http.post(f"/v1/tasks/{task_id}/cancel", headers=headers)
                            assert c.status_code in (200, 409)
                            counts["cancels"] += c.status_code == 200
                        done += 1
                        if done == TASKS // 2:  # a rotation mid-run: old-secret receivers still verify
                            await http.post("/v1/webhooks/secret/rotate", headers=people[0][1])
                        for stage in range(4):
                            if done >= (stage + 1) * TASKS // 4 and not progress[stage].is_set():
                                print(f"stage {stage} at {time.monotonic() - started:.1f}s")
                                progress[stage].set()

                async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                    await asyncio.gather(*(job(http, *j) for j in jobs))

            started = time.monotonic()
            asyncio.run(submit_all())
            submitted = time.monotonic() - started
            saboteur.join()
            replays, cancels = counts["replays"], counts["cancels"]

            deadline = time.monotonic() + 75
            while True:
                with engine.connect() as conn:
                    open_tasks = conn.execute(select(func.count()).select_from(ImageTask)
                                              .where(ImageTask.status.not_in(TERMINAL))).scalar_one()
                    undelivered = conn.execute(select(func.count()).select_from(WebhookDelivery)
                                               .where(WebhookDelivery.status != "delivered")).scalar_one()
                    deliveries = conn.execute(select(func.count()).select_from(WebhookDelivery)).scalar_one()
                if not open_tasks and not undelivered and deliveries == TASKS and len(receiver.delivered) == TASKS:
                    break
                assert time.monotonic() < deadline, (
                    f"after {time.monotonic() - started:.0f}s: {open_tasks} tasks not ended, {undelivered} of "
                    f"{deliveries} webhooks not delivered, {len(receiver.delivered)} received (seed {SEED})")
                time.sleep(0.5)
            settled = time.monotonic() - started

        with engine.connect() as conn:
            tasks = {row.id: row for row in conn.execute(select(ImageTask)).all()}
            entries = conn.execute(select(LedgerEntry)).all()
            per_task_deliveries = dict(conn.execute(
                select(WebhookDelivery.task_id, func.count()).group_by(WebhookDelivery.task_id)).all())
            assert set(tasks) == set(task_ids)
            for account_id, _ in people:
                bal = ledger.balance(conn, account_id)
                assert bal == ledger.ledger_sum(conn, account_id)
                kept = sum(t.charge for t in tasks.values() if t.account_id == account_id and not t.refunded)
                assert bal == money.from_usd("5") - kept, f"account {account_id}: money invariant broken"
                assert bal >= 0

        charges_of, refunds_of = defaultdict(int), defaultdict(int)
        for entry in entries:
            if entry.kind == "charge":
                charges_of[entry.reference] += 1
            elif entry.kind == "refund":
                refunds_of[entry.reference] += 1
        statuses = defaultdict(int)
        for task_id, task in tasks.items():
            statuses[task.status] += 1
            assert task.status in TERMINAL
            assert charges_of[task_id] == 1, task_id
            assert refunds_of[task_id] == (1 if task.refunded else 0), task_id
            assert task.refunded == (task.status != "completed"), task_id
            assert per_task_deliveries[task_id] == 1, f"{task_id} ended more than once"
            # Every event accepted by the receiver is this task's one event, with its final state.
            assert len(receiver.ids[task_id]) == 1, task_id
            for event in receiver.delivered[task_id]:
                assert event["type"] == f"task.{task.status}"
                assert event["data"]["status"] == task.status
                assert event["data"]["refunded"] == task.refunded
        assert receiver.bad_signatures == 0

        taken_up_again = sum(1 for t in tasks.values() if t.attempts > 1)
        print(f"chaos: {TASKS} tasks submitted in {submitted:.1f}s, all ended and delivered after "
              f"{settled:.1f}s; {dict(statuses)}; {replays} idempotent replays, {cancels} cancels; "
              f"{taken_up_again} tasks taken up again after their worker died; "
              f"receiver refused {receiver.refused} attempts")
        assert taken_up_again > 0, "no task was in flight on a killed worker: the test proved nothing"
        assert statuses["completed"] > TASKS // 4 and statuses["failed"] > TASKS // 10
    finally:
        for t in starters:  # a worker still starting when the test failed must be stopped too
            t.join(timeout=60)
        for worker in workers:
            worker.stop()
        beat.terminate()
        beat.wait(timeout=30)
        beat_log.close()
        engine.dispose()
        for key in broker.scan_iter(f"*{queue}*"):
            broker.delete(key)
