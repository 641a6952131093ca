"""What a web process's lifespan changes in the process it undoes when the lifespan ends."""

from __future__ import annotations

import gc

from starlette.testclient import TestClient


def test_gc_tuning_lasts_as_long_as_the_app(database):
    from app.http.app import create_app
    from app.http.lifespan import GC_THRESHOLD

    before = gc.get_threshold()
    with TestClient(create_app()):
        assert gc.get_threshold()[0] == GC_THRESHOLD
        assert gc.get_freeze_count() > 0  # startup's objects are out of the collector's way
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
