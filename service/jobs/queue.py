"""The job queue: RQ on Redis when OPPU_REDIS_URL is set, else an in-process runner. The only importer
of rq (with jobs/worker.py). Queues carry job ids only; the job's state lives in SQL."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from service.config import Settings

log = logging.getLogger(__name__)
QUEUE_NAME = "oppu-training"
ADAPTER_CHANNEL = "oppu:adapters"  # pub/sub: "<owner_key> <version>" after every publish


class JobQueue(Protocol):
    def enqueue(self, job_id: str, attempt: int) -> None: ...
    def depth(self) -> int: ...
    def publish_adapter(self, owner_key: str, version: int | None) -> None: ...
    def close(self) -> None: ...


class RedisJobQueue:
    def __init__(self, url: str, job_timeout_s: int) -> None:
        from redis import Redis
        from rq import Queue

        self.redis = Redis.from_url(url)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.job_timeout_s = job_timeout_s

    def enqueue(self, job_id: str, attempt: int) -> None:
        # One RQ job per attempt: a retry after a killed worker is a fresh RQ job for the same SQL job.
        self.queue.enqueue(
            "service.jobs.tasks.run_job_in_worker",
            job_id,
            job_id=f"{job_id}-a{attempt}",
            job_timeout=self.job_timeout_s,
            result_ttl=3600,
            failure_ttl=24 * 3600,
        )

    def depth(self) -> int:
        return int(self.queue.count)

    def publish_adapter(self, owner_key: str, version: int | None) -> None:
        self.redis.publish(ADAPTER_CHANNEL, f"{owner_key} {version if version is not None else 0}")

    def close(self) -> None:
        self.redis.close()


class InProcessJobQueue:
    """Embedded default: job bodies run on one background thread of the API process."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner  # Callable[[str], None]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oppu-jobs")
        self._pending = 0
        self._lock = threading.Lock()
        self.listeners: list[Any] = []  # Callable[[str, int | None], None], called on publish

    def enqueue(self, job_id: str, attempt: int) -> None:
        with self._lock:
            self._pending += 1
        self._pool.submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
        try:
            self._runner(job_id)
        except Exception:
            log.exception("job %s failed", job_id)
        finally:
            with self._lock:
                self._pending -= 1

    def depth(self) -> int:
        return self._pending

    def publish_adapter(self, owner_key: str, version: int | None) -> None:
        for listener in self.listeners:
            listener(owner_key, version)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_queue(settings: Settings, in_process_runner: Any) -> JobQueue:
    if settings.redis_url:
        return RedisJobQueue(settings.redis_url, settings.job_timeout_s)
    return InProcessJobQueue(in_process_runner)
