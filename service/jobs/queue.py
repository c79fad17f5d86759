"""The job queue: RQ on Redis when OPPU_REDIS_URL is set, else an in-process runner. The only importer
of rq and redis (with jobs/worker.py). Queues carry job ids only; the job's state lives in SQL. It also
carries the adapter-change notices ("<owner_key> <version>") every replica subscribes to, and the revoked,
erased and data-key-rotated ones.

Redis may be down: an enqueue that fails is logged (the worker's reaper enqueues the queued job again once
Redis is back), and a notice is applied to this replica's own listeners FIRST, then published (a failed
publish is logged): a revoked key's streams end here even while Redis is unreachable."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from service.config import Settings

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import PubSub

log = logging.getLogger(__name__)
QUEUE_NAME = "oppu-training"
ENTRY_POINT = "service.jobs.entry.run_job_in_worker"  # what every queue message runs (see jobs/entry.py)
PENDING_RQ_STATES = ("queued", "started", "deferred", "scheduled")
REDIS_CONNECT_TIMEOUT_S = 2.0  # a request that publishes or enqueues never hangs on an unreachable Redis
REDIS_SOCKET_TIMEOUT_S = 5.0
# The RQ worker's blocking dequeue waits this long for a job (RQ's default: 405 s), then loops (heartbeat, stop
# check). Its connection's socket timeout is RQ's margin above it: a network path gone silent (no reset) ends
# in a timeout and a reconnect within 40 s (RQ's own would be 415 s; without one, never).
WORKER_DEQUEUE_TIMEOUT_S = 30
WORKER_SOCKET_MARGIN_S = 10  # RQ raises any socket timeout below dequeue timeout + 10 to that
WORKER_HEALTH_CHECK_S = 30  # a connection idle this long is PINGed before its next command
# Linux defaults probe an idle connection after 2 h; these find a dead peer in about a minute.
_KEEPALIVE = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}
ADAPTER_CHANNEL = "oppu:adapters"  # pub/sub: "<owner_key> <version>" after every publish or delete
REVOKED_CHANNEL = "oppu:revoked"  # pub/sub: "<key hash>,<key hash>..." after keys are revoked or rotated
ERASED_CHANNEL = "oppu:erased"  # pub/sub: "<storage key>" after a user is erased (their engine rows end)
# How long an embedded queue's close waits for the running job to stop at its next progress check (a
# training step is seconds; loading the model has no check).
CLOSE_WAIT_S = 60.0
LISTENER_JOIN_S = 5.0  # a pub/sub listener wakes every second (get_message's timeout) to see its stop
KEYS_CHANNEL = "oppu:keys"  # pub/sub: "<storage key>" after a user's data key rotated (cached keys forgotten)

AdapterListener = Callable[[str, int | None], None]
RevokedListener = Callable[[list[str]], object]
ErasedListener = Callable[[str], object]
KeysListener = Callable[[str], object]


@dataclass(frozen=True)
class Listeners:
    """What a replica does on each notice: drop an owner's cached adapters, end streams of revoked keys."""

    adapter: AdapterListener
    revoked: RevokedListener
    erased: ErasedListener | None = None  # a user's storage key: their queued and running engine rows end
    keys: KeysListener | None = None  # a user's storage key: their data key rotated, cached keys are forgotten


class JobQueue(Protocol):
    def enqueue(self, job_id: str, attempt: int) -> None: ...
    def depth(self) -> int | None: ...  # None: the broker did not answer
    def publish_adapter(self, owner_key: str, version: int | None) -> None: ...
    def publish_revoked(self, key_hashes: list[str]) -> None: ...
    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None: ...
    def close(self) -> None: ...


class RedisJobQueue:
    def __init__(self, url: str, job_timeout_s: int) -> None:
        from redis import Redis
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.url = url
        self.redis = Redis.from_url(
            url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=REDIS_SOCKET_TIMEOUT_S
        )
        # JSON, never pickle: a job is a function path and a job id, and a pickle in Redis would run code
        # on the worker for anyone who can write to Redis.
        self.queue = Queue(QUEUE_NAME, connection=self.redis, serializer=JSONSerializer)
        self.job_timeout_s = job_timeout_s
        self._local: list[Listeners] = []  # this replica's listeners: notices reach them before Redis
        self._listening: list[threading.Thread] = []

    def enqueue(self, job_id: str, attempt: int) -> None:
        # One RQ job per attempt: a retry after a killed worker is a fresh RQ job for the same SQL job. The
        # reaper may enqueue an attempt again (its message may be lost): one still pending is left alone,
        # so the queue (and its depth metric) holds each attempt once.
        rq_id = f"{job_id}-a{attempt}"
        if self._pending(rq_id):
            return
        self.queue.enqueue(
            ENTRY_POINT,
            job_id,
            job_id=rq_id,
            job_timeout=self.job_timeout_s,
            result_ttl=3600,
            failure_ttl=24 * 3600,
        )

    def _pending(self, rq_id: str) -> bool:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job as RqJob

        try:
            job = RqJob.fetch(rq_id, connection=self.redis, serializer=self.queue.serializer)
        except NoSuchJobError:
            return False
        return job.get_status(refresh=False) in PENDING_RQ_STATES  # RQ's JobStatus is a str enum

    def depth(self) -> int | None:
        from redis.exceptions import RedisError

        try:
            return int(self.queue.count)
        except (RedisError, OSError) as exc:
            log.warning("job queue depth unknown: %r", exc)
            return None

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except Exception:
            return False

    def worker_connection(self, dequeue_timeout_s: int = WORKER_DEQUEUE_TIMEOUT_S) -> Redis:
        """A connection for an RQ worker whose blocking dequeue waits `dequeue_timeout_s`: its socket timeout is
        above that, with TCP keepalive and a health check, so a dead or silent path ends in an error (the worker
        reconnects) rather than a wait forever."""
        from redis import Redis

        return Redis.from_url(
            self.url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_timeout=dequeue_timeout_s + WORKER_SOCKET_MARGIN_S,
            socket_keepalive=True,
            socket_keepalive_options=_KEEPALIVE,
            health_check_interval=WORKER_HEALTH_CHECK_S,
        )

    def publish_adapter(self, owner_key: str, version: int | None) -> None:
        for listeners in list(self._local):
            _apply(listeners.adapter, owner_key, version)
        self._publish(ADAPTER_CHANNEL, f"{owner_key} {version if version is not None else 0}")

    def publish_revoked(self, key_hashes: list[str]) -> None:
        if not key_hashes:
            return
        for listeners in list(self._local):
            _apply(listeners.revoked, key_hashes)
        self._publish(REVOKED_CHANNEL, ",".join(key_hashes))

    def publish_erased(self, storage_key: str) -> None:
        for listeners in list(self._local):
            if listeners.erased is not None:
                _apply(listeners.erased, storage_key)
        self._publish(ERASED_CHANNEL, storage_key)

    def publish_keys(self, storage_key: str) -> None:
        for listeners in list(self._local):
            if listeners.keys is not None:
                _apply(listeners.keys, storage_key)
        self._publish(KEYS_CHANNEL, storage_key)

    def _publish(self, channel: str, data: str) -> None:
        """Other replicas hear it when Redis is up; this one has acted already (it hears it twice: harmless)."""
        try:
            self.redis.publish(channel, data)
        except Exception as exc:
            log.warning("could not publish on %s (Redis unreachable?): %s", channel, type(exc).__name__)

    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None:
        """Calls the listeners for every notice (every replica's, this one's included), on a daemon thread,
        until `stop` is set."""
        self._local.append(listeners)
        thread = threading.Thread(target=self._listen, args=(listeners, stop), name="oppu-pubsub", daemon=True)
        self._listening.append(thread)
        thread.start()

    def _listen(self, listeners: Listeners, stop: threading.Event) -> None:
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(ADAPTER_CHANNEL, REVOKED_CHANNEL, ERASED_CHANNEL, KEYS_CHANNEL)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and isinstance(message.get("data"), bytes):
                        _deliver(listeners, message["channel"], message["data"])
            except Exception as exc:  # Redis down: retry every second, quietly (readyz reports it)
                log.warning("pub/sub listener lost Redis (%s); reconnecting", type(exc).__name__)
                stop.wait(1.0)
            finally:
                if pubsub is not None:
                    _close_quietly(pubsub)

    def close(self) -> None:
        """After the subscription's `stop` is set: the listener threads end within a get_message timeout; a
        notice being applied (it may hold a database connection) finishes before the database goes."""
        for thread in self._listening:
            thread.join(LISTENER_JOIN_S)
        self.redis.close()


class InProcessJobQueue:
    """Embedded default: job bodies run on one background thread of the API process, once a runner is
    attached (the composition root attaches it after building the job context)."""

    def __init__(self) -> None:
        self._runner: Callable[[str], None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oppu-jobs")
        self._lock = threading.Lock()
        self._listeners: list[Listeners] = []
        self._futures: set[futures.Future[None]] = set()  # queued or running; a cancelled one leaves too
        self._waiting: set[str] = set()  # job ids queued and not started

    def attach(self, runner: Callable[[str], None]) -> None:
        self._runner = runner

    def enqueue(self, job_id: str, attempt: int) -> None:
        with self._lock:
            if job_id in self._waiting:  # the reaper re-enqueues queued jobs: one entry each, as Redis's queue
                return
            self._waiting.add(job_id)
            future = self._pool.submit(self._run, job_id)
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: futures.Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def _run(self, job_id: str) -> None:
        with self._lock:
            self._waiting.discard(job_id)  # running now: a later enqueue (a requeue) is a new entry
        try:
            if self._runner is None:
                raise RuntimeError("no job runner attached")
            self._runner(job_id)
        except Exception:
            log.exception("job %s failed", job_id)

    def depth(self) -> int | None:
        with self._lock:
            return len(self._futures)

    def publish_adapter(self, owner_key: str, version: int | None) -> None:
        for listeners in list(self._listeners):
            listeners.adapter(owner_key, version)

    def publish_revoked(self, key_hashes: list[str]) -> None:
        for listeners in list(self._listeners):
            listeners.revoked(key_hashes)

    def publish_erased(self, storage_key: str) -> None:
        for listeners in list(self._listeners):
            if listeners.erased is not None:
                listeners.erased(storage_key)

    def publish_keys(self, storage_key: str) -> None:
        for listeners in list(self._listeners):
            if listeners.keys is not None:
                listeners.keys(storage_key)

    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None:
        self._listeners.append(listeners)

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Queued jobs are dropped (the next start re-queues them from SQL); the running one is waited for a
        while: the shutdown signal (JobContext.stopping, set first) stops it at its next progress check, so it
        never outlives the database it writes to."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = list(self._futures)
        if running and wait_s > 0:
            futures.wait(running, timeout=wait_s)


def _apply(action: Callable[..., object], *args: object) -> None:
    try:
        action(*args)
    except Exception:
        log.exception("a local notice listener failed")


def erased_notice(queue: JobQueue) -> Callable[[str], None]:
    """How an erase tells every replica (this one first) to end the user's engine rows."""
    if isinstance(queue, RedisJobQueue | InProcessJobQueue):
        return queue.publish_erased
    return lambda _storage_key: None  # a queue nobody serves behind (`oppu train`, test fakes)


def keys_notice(queue: JobQueue) -> Callable[[str], None]:
    """How a data-key rotation tells every replica (this one first) to forget the user's cached keys at once
    (the SQL outbox carries it too: `notices.outbox.record_keys`)."""
    if isinstance(queue, RedisJobQueue | InProcessJobQueue):
        return queue.publish_keys
    return lambda _storage_key: None


def queue_checks(queue: JobQueue) -> dict[str, bool]:
    """What readiness reports about the queue: Redis reachable (only when Redis is used)."""
    return {"redis": queue.ping()} if isinstance(queue, RedisJobQueue) else {}


def _deliver(listeners: Listeners, channel: bytes | str, data: bytes) -> None:
    """One notice to this replica's listeners. A listener that fails (e.g. a database blip in its SQL read) is
    logged, and the subscription is kept with the notices buffered on it: only a Redis error re-subscribes."""
    try:
        _dispatch(listeners, channel, data.decode())
    except Exception:
        log.exception("a notice listener failed on %r", channel)


def _close_quietly(pubsub: PubSub) -> None:
    try:
        pubsub.close()
    except Exception as exc:  # its connection may be gone with Redis
        log.debug("pub/sub close failed: %s", type(exc).__name__)


def _dispatch(listeners: Listeners, channel: bytes | str, data: str) -> None:
    name = channel.decode() if isinstance(channel, bytes) else channel
    if name == REVOKED_CHANNEL:
        listeners.revoked([h for h in data.split(",") if h])
    elif name == ERASED_CHANNEL:
        if listeners.erased is not None:
            listeners.erased(data)
    elif name == KEYS_CHANNEL:
        if listeners.keys is not None:
            listeners.keys(data)
    else:
        owner, _, version = data.partition(" ")
        listeners.adapter(owner, int(version) if version.isdigit() and int(version) > 0 else None)


def make_queue(settings: Settings) -> JobQueue:
    if settings.redis_url:
        return RedisJobQueue(settings.redis_url, settings.job_timeout_s)
    return InProcessJobQueue()


class NoQueue:
    """Jobs run in the foreground (`oppu train`, the evaluation): nothing is enqueued or published."""

    def enqueue(self, job_id: str, attempt: int) -> None: ...

    def depth(self) -> int | None:
        return 0

    def publish_adapter(self, owner_key: str, version: int | None) -> None: ...

    def publish_revoked(self, key_hashes: list[str]) -> None: ...

    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None: ...

    def close(self) -> None: ...
