from __future__ import annotations

import pytest

from tests.servers import ThreadedServer
from tests.webhooks.receiver import Receiver


@pytest.fixture(scope="session")
def receiver():
    hooks = Receiver()
    with ThreadedServer(hooks.app, limit_concurrency=1000) as server:
        hooks.base = server.url
        yield hooks
