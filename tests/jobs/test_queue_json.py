"""RQ payloads in Redis are JSON, never pickles (a pickle in Redis runs code on the worker for anyone who can
write to Redis): checked on the real Redis server."""

from __future__ import annotations

import json
import zlib

import pytest

from service.jobs.queue import RedisJobQueue
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.redis


def test_enqueued_job_is_json() -> None:
    queue = RedisJobQueue(REDIS_URL.rsplit("/", 1)[0] + "/14", 60)
    try:
        queue.queue.empty()
        queue.enqueue("job-json-check", 1)
        raw = queue.redis.hget("rq:job:job-json-check-a1", "data")
        assert isinstance(raw, bytes)
        assert json.loads(zlib.decompress(raw)) == [
            "service.jobs.entry.run_job_in_worker",
            None,
            ["job-json-check"],
            {},
        ]
    finally:
        queue.queue.empty()
        queue.redis.delete("rq:job:job-json-check-a1")
        queue.close()


def test_an_attempt_still_in_the_queue_is_not_enqueued_twice() -> None:
    """The reaper may enqueue a queued job again (its message may be lost); one still waiting is left alone, so
    the queue and its depth metric hold each attempt once."""
    queue = RedisJobQueue(REDIS_URL.rsplit("/", 1)[0] + "/14", 60)
    try:
        queue.queue.empty()
        queue.enqueue("job-once", 1)
        queue.enqueue("job-once", 1)
        assert queue.depth() == 1
        queue.enqueue("job-once", 2)  # a new attempt is a new message
        assert queue.depth() == 2
    finally:
        queue.queue.empty()
        queue.redis.delete("rq:job:job-once-a1", "rq:job:job-once-a2")
        queue.close()
