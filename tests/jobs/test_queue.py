"""service/jobs/queue.py on the real Redis: closing the queue waits for its pub/sub listener (a notice being
applied may hold a database connection that must be back before the database is disposed)."""

from __future__ import annotations

import threading
import time

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


def test_the_in_process_queue_holds_a_job_once_however_often_it_is_enqueued() -> None:
    # The embedded reaper re-enqueues every queued job each period while the one runner is busy: the backlog
    # grew by one entry per job per period (and queue depth with it).
    from service.jobs.queue import InProcessJobQueue

    queue = InProcessJobQueue()
    release, ran = threading.Event(), []

    def run(job_id: str) -> None:
        ran.append(job_id)
        release.wait(10)

    queue.attach(run)
    try:
        queue.enqueue("long", 1)
        for _ in range(10):
            queue.enqueue("waiting", 1)
        assert queue.depth() == 2
        release.set()
        deadline = time.monotonic() + 10
        while queue.depth():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        release.set()
        queue.close(wait_s=5)
    assert ran == ["long", "waiting"]
