"""service/jobs/queue.py on the real Redis: closing the queue waits for its pub/sub listener (a notice being
applied may hold a database connection that must be back before the database is disposed)."""

from __future__ import annotations

import threading

import pytest

from service.jobs.queue import Listeners, RedisJobQueue
from tests.factories import redis_url

pytestmark = pytest.mark.redis


def test_close_waits_for_the_pubsub_listener_to_end() -> None:
    queue = RedisJobQueue(redis_url(15), job_timeout_s=60)
    stop = threading.Event()
    before = set(threading.enumerate())
    queue.subscribe(Listeners(lambda *_: None, lambda _: None), stop)
    listeners = [t for t in threading.enumerate() if t not in before and t.name == "oppu-pubsub"]
    assert len(listeners) == 1
    stop.set()
    queue.close()
    assert not any(t.is_alive() for t in listeners)
