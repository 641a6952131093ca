"""Test environment: databases, broker, a real Celery worker process, loopback fake upstreams.

With MEDIAGATE_TEST_DATABASE_URL and MEDIAGATE_TEST_REDIS_URL set, everything
runs against that PostgreSQL (a fresh database per run, dropped after) and
Redis (its database flushed), with a real worker process on the Redis broker.
Without them: SQLite and the embedded filesystem broker, with the same worker.

The environment is set here, at import, because the worker process and
workers.celery_app read their settings once, from it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import ThreadedServer, reserve

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("MEDIAGATE_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("MEDIAGATE_TEST_REDIS_URL")
INTEGRATION = bool(PG_URL and REDIS_URL)
RUN_DIR = Path(tempfile.mkdtemp(prefix="mediagate-test-"))
# Bound now, served later: the ports are ours from the start (the catalog below names them).
UPSTREAM_SOCKET = reserve()
UPSTREAM_PORT = UPSTREAM_SOCKET.getsockname()[1]
UPSTREAM = f"http://127.0.0.1:{UPSTREAM_PORT}"
# The fake LLM upstreams (OpenAI, Anthropic, Gemini wire formats) listen here; see tests/proxy.
LLM_SOCKET = reserve()
LLM_PORT = LLM_SOCKET.getsockname()[1]
LLM_UPSTREAM = f"http://127.0.0.1:{LLM_PORT}"
TEST_DB_NAME = f"mediagate_test_{os.getpid()}_{secrets.token_hex(3)}"


def _pg_url_for(database: str) -> str:
    from sqlalchemy.engine import make_url

    from app.core.settings import normalize_database_url

    return make_url(normalize_database_url(PG_URL)).set(database=database).render_as_string(hide_password=False)


CATALOG = f"""
[providers.local]
format = "local"

[providers.fakeopenai]
format = "openai"
base_url = "{UPSTREAM}/openai/v1"
api_key = "sk-upstream-openai"

[providers.fakegemini]
format = "gemini"
base_url = "{UPSTREAM}/gemini"
api_key = "upstream-gemini-key"

[providers.llm-openai]
format = "openai"
base_url = "{LLM_UPSTREAM}/openai/v1"
api_key = "sk-upstream-llm-openai"

[providers.llm-anthropic]
format = "anthropic"
base_url = "{LLM_UPSTREAM}/anthropic"
api_key = "sk-ant-upstream"

[providers.llm-gemini]
format = "gemini"
base_url = "{LLM_UPSTREAM}/gemini"
api_key = "upstream-gemini-llm-key"

[[models]]
name = "local-image"
provider = "local"
api = "image"
prices = {{ "1k" = "0.001", "2k" = "0.002", "4k" = "0.004" }}

[[models]]
name = "gpt-image-2"
provider = "fakeopenai"
api = "image"
prices = {{ "1k" = "0.012", "2k" = "0.024", "4k" = "0.048" }}

[[models]]
name = "narrow-image"
provider = "fakeopenai"
api = "image"
upstream_model = "gpt-image-1"
prices = {{ "1k" = "0.01", "2k" = "0.02" }}
sizes = ["1:1", "3:2", "2:3"]
resolutions = ["1k", "2k"]

[providers.fakeslow]
format = "openai"
base_url = "{UPSTREAM}/openai/v1"
api_key = "sk-upstream-openai"
timeout = 0.5

[[models]]
name = "slow-image"
provider = "fakeslow"
api = "image"
upstream_model = "gpt-image-2"
prices = {{ "1k" = "0.012", "2k" = "0.024", "4k" = "0.048" }}

[[models]]
name = "gemini-image"
provider = "fakegemini"
api = "image"
upstream_model = "gemini-3-pro-image-preview"
prices = {{ "1k" = "0.039", "2k" = "0.078", "4k" = "0.156" }}

# LLM models on the fake LLM upstreams (tests/fakes/llm.py, tests/proxy).
[[models]]
name = "gpt-4o"
provider = "llm-openai"
api = "chat"
input_per_mtok = "2.50"
output_per_mtok = "10.00"
cached_input_per_mtok = "1.25"
max_output_tokens = 16384

[[models]]
name = "qwen-max"
provider = "llm-openai"
api = "chat"
upstream_model = "qwen-max-2025-01-25"
input_per_mtok = "1.60"
output_per_mtok = "6.40"

[[models]]
name = "deepseek-r1"  # the README's OpenClaw example lists it
provider = "llm-openai"
api = "chat"
upstream_model = "deepseek-reasoner"
input_per_mtok = "0.55"
output_per_mtok = "2.19"

[[models]]
name = "gpt-5.4"
provider = "llm-openai"
api = "responses"
input_per_mtok = "1.25"
output_per_mtok = "10.00"
cached_input_per_mtok = "0.125"
max_output_tokens = 128000

[[models]]
name = "claude-sonnet-4-6"
provider = "llm-anthropic"
api = "messages"
input_per_mtok = "3.00"
output_per_mtok = "15.00"
cached_input_per_mtok = "0.30"
max_output_tokens = 64000

[[models]]
name = "gemini-2.5-flash"
provider = "llm-gemini"
api = "gemini"
input_per_mtok = "0.30"
output_per_mtok = "2.50"
cached_input_per_mtok = "0.075"
max_output_tokens = 65536

# The LLM fake again, with a short read timeout: for silences before and during an answer.
[providers.llm-slow-openai]
format = "openai"
base_url = "{LLM_UPSTREAM}/openai/v1"
api_key = "sk-upstream-llm-openai"
timeout = 0.5

[providers.llm-slow-anthropic]
format = "anthropic"
base_url = "{LLM_UPSTREAM}/anthropic"
api_key = "sk-ant-upstream"
timeout = 0.5

[[models]]
name = "slow-chat"
provider = "llm-slow-openai"
upstream_model = "gpt-4o"
api = "chat"
input_per_mtok = "1.00"
output_per_mtok = "1.00"

[[models]]
name = "slow-claude"
provider = "llm-slow-anthropic"
upstream_model = "claude-sonnet-4-6"
api = "messages"
input_per_mtok = "1.00"
output_per_mtok = "1.00"

# An upstream that refuses connections (nothing listens on port 9).
[providers.llm-down]
format = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-down"

[[models]]
name = "down-chat"
provider = "llm-down"
api = "chat"
input_per_mtok = "1.00"
output_per_mtok = "1.00"
"""

(RUN_DIR / "catalog.toml").write_text(CATALOG)
os.environ.update({
    "MEDIAGATE_DATA_DIR": str(RUN_DIR / "data"),
    "MEDIAGATE_CATALOG": str(RUN_DIR / "catalog.toml"),
    "MEDIAGATE_PUBLIC_URL": "http://testserver",
    "MEDIAGATE_BACKEND_RETRY_BACKOFF": "0.05",
    "MEDIAGATE_BACKEND_TIMEOUT": "20",
    "MEDIAGATE_KEY_CACHE_SECONDS": "0.5",
    # A client that leaves mid-answer: the gateway reads on for the usage this long (default 5 s).
    "MEDIAGATE_USAGE_DRAIN_SECONDS": "2",
    "MEDIAGATE_ALLOW_PRIVATE_URLS": "1",
    "MEDIAGATE_WORKER_CONCURRENCY": "250",
    # Many apps and worker processes are alive at once in a run (and the chaos test starts more):
    # small pools keep the total under PostgreSQL's default 100 connections.
    "MEDIAGATE_DB_POOL_SIZE": "4",
    # Webhook retries in seconds, not hours, and a receiver that hangs is given up on quickly.
    "MEDIAGATE_WEBHOOK_SCHEDULE": "0.3,0.6,1",
    "MEDIAGATE_WEBHOOK_TIMEOUT": "3",
})
if INTEGRATION:
    os.environ["MEDIAGATE_DATABASE_URL"] = _pg_url_for(TEST_DB_NAME)
    os.environ["MEDIAGATE_BROKER_URL"] = REDIS_URL
else:
    os.environ.pop("MEDIAGATE_DATABASE_URL", None)
    os.environ.pop("MEDIAGATE_BROKER_URL", None)


@pytest.fixture(scope="session")
def settings():
    from app.core.settings import Settings

    return Settings.from_env()


@pytest.fixture(scope="session", autouse=True)
def _reserved_sockets():
    """The reserved ports' sockets close at the end even when no fake server took them."""
    yield
    UPSTREAM_SOCKET.close()
    LLM_SOCKET.close()


@pytest.fixture(scope="session", autouse=True)
def database(settings):
    """A fresh, migrated database for this run."""
    from app.core.migrations import upgrade

    if INTEGRATION:
        import psycopg

        admin = _pg_url_for("postgres").replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{TEST_DB_NAME}"')
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    yield settings.database_url
    if INTEGRATION:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DB_NAME}" WITH (FORCE)')
        redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture(scope="session")
def engine(database, settings):
    from app.core.db import make_engine

    engine = make_engine(settings.database_url, pool_size=5)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def fake_images():
    from tests.fakes.images import FakeImageUpstream

    fake = FakeImageUpstream()
    with ThreadedServer(fake.app, sock=UPSTREAM_SOCKET, limit_concurrency=2000, backlog=2048):
        yield fake


@pytest.fixture(scope="session")
def llm_upstream():
    """The fake OpenAI, Anthropic and Gemini APIs (tests/fakes/llm.py) on LLM_PORT."""
    from tests.fakes.llm import FakeLLMUpstream

    fake = FakeLLMUpstream()
    # "critical": the [drop] marker breaks connections on purpose, which uvicorn would log as errors.
    with ThreadedServer(fake, sock=LLM_SOCKET, log_level="critical", limit_concurrency=2000, backlog=2048):
        yield fake


@pytest.fixture(scope="session")
def receiver():
    """A webhook receiver on loopback (tests/webhooks/receiver.py)."""
    from tests.webhooks.receiver import Receiver

    hooks = Receiver()
    with ThreadedServer(hooks.app, limit_concurrency=1000) as server:
        hooks.base = server.url
        yield hooks


class Worker:
    """A real `celery worker` process on this run's broker and database."""

    def __init__(self, log_path: Path, extra: list[str] = (), env: dict[str, str] | None = None):
        self.log_path = log_path
        self.extra = list(extra)
        self.env = env  # overrides of this process's environment (tests/test_chaos.py)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.log = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size
        argv = [sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "--loglevel", "INFO",
                "--without-gossip", "--without-mingle", "--without-heartbeat", *self.extra]
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                if b" ready." in fh.read():
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError("worker exited:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.1)
        raise RuntimeError("worker did not become ready:\n" + self.log_path.read_text()[-3000:])

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def worker(database, fake_images):
    proc = Worker(RUN_DIR / "worker.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def app(database):
    from app.http.app import create_app

    return create_app()


@pytest.fixture(scope="session")
def client(app):
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        yield client


@dataclass
class TestAccount:
    id: int
    key: str
    email: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def make_account(engine):
    from app.core import accounts, keys, money

    def make(balance: str = "10") -> TestAccount:
        email = f"user-{secrets.token_hex(5)}@example.com"
        with engine.begin() as conn:
            account_id = accounts.create(conn, email, money.from_usd(balance))
            key = keys.create(conn, account_id, "test").key
        return TestAccount(account_id, key, email)

    return make


@pytest.fixture
def account(make_account) -> TestAccount:
    return make_account()


def wait_for_task(client, headers, task_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/tasks/{task_id}", headers=headers).json()
        if body["status"] in ("completed", "failed", "canceled"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {body['status']} after {timeout}s")
        time.sleep(0.1)
