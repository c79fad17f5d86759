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
