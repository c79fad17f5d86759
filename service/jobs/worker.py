"""`oppu worker`: an RQ worker on the training queue plus a reaper that re-enqueues what would otherwise be
lost: jobs whose worker died (stale heartbeat) and queued jobs whose queue message may be gone (Redis was
down at the enqueue, or restarted empty). Work horses run service.jobs.entry, whose context factory the
composition root installed before this starts."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from service.config import Settings
from service.jobs import entry
from service.jobs.context import JobContext
from service.jobs.queue import QUEUE_NAME, RedisJobQueue
from service.jobs.tasks import prune, reap

log = logging.getLogger(__name__)


def reaper_every_s(settings: Settings) -> float:
    return max(0.5, min(settings.job_stale_after_s, settings.job_requeue_after_s) / 4)


def run_reaper(settings: Settings, ctx: JobContext, stop: threading.Event) -> None:
    """SQL-only: never loads the model, never touches CUDA. Survives Redis and database outages."""
    while not stop.is_set():
        try:
            if n := reap(ctx):
                log.warning("re-enqueued or failed %d job(s)", n)
            if n := prune(ctx):
                log.info("deleted %d finished job(s) past OPPU_JOB_KEEP_S", n)
        except Exception as exc:
            log.warning("reaper tick failed: %s", type(exc).__name__)
        stop.wait(reaper_every_s(settings))


# Sent by the worker to its work horse on a warm shutdown (SIGTERM/SIGINT): the horse runs in its own process
# group, so the stop signal of a container reaches the worker only.
STOP_JOB_SIGNAL = signal.SIGUSR1


def graceful_worker_class() -> type[Any]:
    """RQ's Worker, whose warm shutdown also stops the running job at its next progress check: the job gives
    its attempt back (queued again, not counted) instead of running on until the container is killed (that
    counted an attempt: three deploys mid-training failed a job)."""
    from rq import Worker

    class GracefulWorker(Worker):  # type: ignore[misc]
        def request_stop(self, signum: int, frame: FrameType | None) -> None:
            if self.horse_pid:
                try:
                    os.kill(self.horse_pid, STOP_JOB_SIGNAL)
                except ProcessLookupError:
                    pass  # the horse has just ended
            super().request_stop(signum, frame)

        def setup_work_horse_signals(self) -> None:
            super().setup_work_horse_signals()
            signal.signal(STOP_JOB_SIGNAL, lambda _signum, _frame: entry.stop_running_job())

    return GracefulWorker


def run_worker(settings: Settings, ctx: JobContext, *, burst: bool = False) -> None:
    from rq.serializers import JSONSerializer

    worker_class = graceful_worker_class()

    queue = ctx.queue
    if not isinstance(queue, RedisJobQueue):
        raise SystemExit("oppu worker needs OPPU_REDIS_URL (the embedded default runs jobs in the API)")
    stop = threading.Event()
    threading.Thread(target=run_reaper, args=(settings, ctx, stop), name="oppu-reaper", daemon=True).start()
    # Import the training libraries once in the parent (CPU-only imports, no CUDA init): each forked
    # work horse then starts training without paying seconds of imports.
    import peft  # noqa: F401
    import transformers  # noqa: F401

    try:
        while True:
            while not queue.ping():  # Redis down: wait for it (jobs requested meanwhile wait in SQL, queued)
                log.warning("Redis is unreachable; the worker starts once it is back")
                time.sleep(1.0)
            try:
                worker = worker_class([QUEUE_NAME], connection=queue.worker_connection(), serializer=JSONSerializer)
                worker.work(burst=burst, with_scheduler=False)
                return  # asked to stop, or a burst is done
            except Exception as exc:
                # RQ retries a lost connection while it waits for a job, not in every step (heartbeat,
                # teardown): Redis going away may end work() with an error. A fresh worker once it is back.
                if queue.ping():
                    raise
                log.warning("the worker lost Redis (%s); it starts again once Redis is back", type(exc).__name__)
    finally:
        stop.set()
