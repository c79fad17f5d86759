"""The job queue: RQ on Redis when OPPU_REDIS_URL is set, else an in-process runner. The only importer
of rq and redis (with jobs/worker.py). Queues carry job ids only; the job's state lives in SQL. It also
carries the adapter-change notices ("<owner_key> <version>") every replica subscribes to."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from service.config import Settings

log = logging.getLogger(__name__)
QUEUE_NAME = "oppu-training"
ADAPTER_CHANNEL = "oppu:adapters"  # pub/sub: "<owner_key> <version>" after every publish or delete
REVOKED_CHANNEL = "oppu:revoked"  # pub/sub: "<key hash>,<key hash>..." after keys are revoked or rotated

AdapterListener = Callable[[str, int | None], None]
RevokedListener = Callable[[list[str]], object]


@dataclass(frozen=True)
class Listeners:
    """What a replica does on each notice: drop an owner's cached adapters, end streams of revoked keys."""

    adapter: AdapterListener
    revoked: RevokedListener


class JobQueue(Protocol):
    def enqueue(self, job_id: str, attempt: int) -> None: ...
    def depth(self) -> int: ...
    def publish_adapter(self, owner_key: str, version: int | None) -> None: ...
    def publish_revoked(self, key_hashes: list[str]) -> None: ...
    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None: ...
    def close(self) -> None: ...


class RedisJobQueue:
    def __init__(self, url: str, job_timeout_s: int) -> None:
        from redis import Redis
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.redis = Redis.from_url(url)
        # JSON, never pickle: a job is a function path and a job id, and a pickle in Redis would run code
        # on the worker for anyone who can write to Redis.
        self.queue = Queue(QUEUE_NAME, connection=self.redis, serializer=JSONSerializer)
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

    def publish_revoked(self, key_hashes: list[str]) -> None:
        if key_hashes:
            self.redis.publish(REVOKED_CHANNEL, ",".join(key_hashes))

    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None:
        """Calls the listeners for every notice (every replica's, this one's included), on a daemon thread,
        until `stop` is set."""
        threading.Thread(target=self._listen, args=(listeners, stop), name="oppu-pubsub", daemon=True).start()

    def _listen(self, listeners: Listeners, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(ADAPTER_CHANNEL, REVOKED_CHANNEL)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and isinstance(message.get("data"), bytes):
                        _dispatch(listeners, message["channel"], message["data"].decode())
            except Exception:
                log.exception("pub/sub listener failed; reconnecting")
                stop.wait(1.0)

    def close(self) -> None:
        self.redis.close()


class InProcessJobQueue:
    """Embedded default: job bodies run on one background thread of the API process, once a runner is
    attached (the composition root attaches it after building the job context)."""

    def __init__(self) -> None:
        self._runner: Callable[[str], None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oppu-jobs")
        self._pending = 0
        self._lock = threading.Lock()
        self._listeners: list[Listeners] = []

    def attach(self, runner: Callable[[str], None]) -> None:
        self._runner = runner

    def enqueue(self, job_id: str, attempt: int) -> None:
        with self._lock:
            self._pending += 1
        self._pool.submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
        try:
            if self._runner is None:
                raise RuntimeError("no job runner attached")
            self._runner(job_id)
        except Exception:
            log.exception("job %s failed", job_id)
        finally:
            with self._lock:
                self._pending -= 1

    def depth(self) -> int:
        return self._pending

    def publish_adapter(self, owner_key: str, version: int | None) -> None:
        for listeners in list(self._listeners):
            listeners.adapter(owner_key, version)

    def publish_revoked(self, key_hashes: list[str]) -> None:
        for listeners in list(self._listeners):
            listeners.revoked(key_hashes)

    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None:
        self._listeners.append(listeners)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _dispatch(listeners: Listeners, channel: bytes | str, data: str) -> None:
    name = channel.decode() if isinstance(channel, bytes) else channel
    if name == REVOKED_CHANNEL:
        listeners.revoked([h for h in data.split(",") if h])
    else:
        owner, _, version = data.partition(" ")
        listeners.adapter(owner, int(version) if version.isdigit() and int(version) > 0 else None)


def make_queue(settings: Settings) -> JobQueue:
    if settings.redis_url:
        return RedisJobQueue(settings.redis_url, settings.job_timeout_s)
    return InProcessJobQueue()
