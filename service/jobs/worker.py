"""`oppu worker`: an RQ worker on the training queue plus a reaper that retries jobs whose worker died."""

from __future__ import annotations

import logging
import threading

from service.config import Settings
from service.jobs.queue import QUEUE_NAME, RedisJobQueue
from service.jobs.tasks import JobContext, reap_stale

log = logging.getLogger(__name__)


def run_worker(settings: Settings, ctx: JobContext, *, burst: bool = False) -> None:
    from rq import Worker
    from rq.serializers import JSONSerializer

    queue = ctx.queue
    if not isinstance(queue, RedisJobQueue):
        raise SystemExit("oppu worker needs OPPU_REDIS_URL (the embedded default runs jobs in the API)")
    stop = threading.Event()

    def reaper() -> None:  # SQL-only: never loads the model, never touches CUDA
        while not stop.is_set():
            try:
                if n := reap_stale(ctx):
                    log.warning("re-enqueued %d stale job(s)", n)
            except Exception:
                log.exception("reaper failed")
            stop.wait(max(1.0, settings.job_stale_after_s / 4))

    threading.Thread(target=reaper, name="oppu-reaper", daemon=True).start()
    # Import the training libraries once in the parent (CPU-only imports, no CUDA init): each forked
    # work horse then starts training without paying seconds of imports.
    import peft  # noqa: F401
    import transformers  # noqa: F401

    try:
        Worker([QUEUE_NAME], connection=queue.redis, serializer=JSONSerializer).work(burst=burst, with_scheduler=False)
    finally:
        stop.set()
