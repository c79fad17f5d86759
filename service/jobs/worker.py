"""`oppu worker`: RQ workers on the training queue, one after another until a stop is asked (an RQ worker
that a Redis fault ended is followed by a fresh one, once the work horse it left has ended: one job at a
time), plus a reaper that re-enqueues what would otherwise be lost: jobs whose worker died (stale heartbeat)
and queued jobs whose queue message may be gone (Redis was down at the enqueue, or restarted empty). Work
horses run service.jobs.entry, whose context factory the composition root installed before this starts."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from service.config import Settings
from service.errors import safe_error_text
from service.jobs import entry
from service.jobs.context import JobContext
from service.jobs.queue import QUEUE_NAME, WORKER_DEQUEUE_TIMEOUT_S, RedisJobQueue
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
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESTART_WAIT_S = 1.0  # between an RQ worker that ended without a stop and the next (Redis may be coming back)
# RQ's registry cleanup (its default: every 10 min). A message whose dequeue reply was lost sits in RQ's
# intermediate queue, "queued", until a cleanup fails it (2 passes, over a minute apart); only then does the
# reaper's re-enqueue take (the queue skips an attempt it still holds).
MAINTENANCE_EVERY_S = 60


def graceful_worker_class(stopping: threading.Event, dequeue_timeout_s: int = WORKER_DEQUEUE_TIMEOUT_S) -> type[Any]:
    """RQ's Worker, whose warm shutdown also stops the running job at its next progress check: the job gives
    its attempt back (queued again, not counted) instead of running on until the container is killed (that
    counted an attempt: three deploys mid-training failed a job). It sets `stopping` on a stop signal and when
    a burst finds the queue empty: the WorkerLoop starts no other worker then."""
    from rq import Worker
    from rq.exceptions import StopRequested

    class GracefulWorker(Worker):  # type: ignore[misc]
        @property
        def dequeue_timeout(self) -> int:
            return dequeue_timeout_s  # below its connection's socket timeout (RedisJobQueue.worker_connection)

        def request_stop(self, signum: int, frame: FrameType | None) -> None:
            stopping.set()
            if self.horse_pid:
                _signal(self.horse_pid, STOP_JOB_SIGNAL)
            super().request_stop(signum, frame)

        def check_for_suspension(self, burst: bool) -> None:
            if stopping.is_set():  # asked while this worker started, before its signal handlers were in place
                raise StopRequested
            try:
                super().check_for_suspension(burst)
            except StopRequested:
                stopping.set()  # suspended in burst mode: the burst is over
                raise

        def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            if result is None:  # only when a burst finds the queue empty (no max_idle_time here): the run is done
                stopping.set()
            return result

        def setup_work_horse_signals(self) -> None:
            super().setup_work_horse_signals()
            signal.signal(STOP_JOB_SIGNAL, lambda _signum, _frame: entry.stop_running_job())

    return GracefulWorker


def rq_workers(
    queue: RedisJobQueue,
    stopping: threading.Event,
    *,
    dequeue_timeout_s: int = WORKER_DEQUEUE_TIMEOUT_S,
    **options: Any,
) -> Callable[[], Any]:
    """Makes the RQ workers a WorkerLoop runs, each on a fresh connection; `options` go to RQ's Worker."""
    from rq.serializers import JSONSerializer

    worker_class = graceful_worker_class(stopping, dequeue_timeout_s)
    options.setdefault("maintenance_interval", MAINTENANCE_EVERY_S)

    def new_worker() -> Any:
        connection = queue.worker_connection(dequeue_timeout_s)
        try:
            return worker_class([QUEUE_NAME], connection=connection, serializer=JSONSerializer, **options)
        except BaseException:  # e.g. Redis gone again: its first command failed
            connection.close()
            raise

    return new_worker


class WorkerLoop:
    """Runs RQ workers one after another until `stopping` is set (a stop signal, or a burst done). RQ's loop
    ends on a Redis error in a step it does not retry (the job's heartbeat, its teardown), or returns as if
    done, while its work horse (in its own process group) may still run the job: before a fresh worker starts,
    that horse is waited for (its job keeps its SQL heartbeat) and reaped, and a stop signal meanwhile reaches
    it as a warm shutdown's would. Errors are logged and retried, never raised. Runs in the main thread."""

    def __init__(
        self,
        new_worker: Callable[[], Any],
        redis_up: Callable[[], bool],
        stopping: threading.Event,
        *,
        burst: bool = False,
        restart_wait_s: float = RESTART_WAIT_S,
    ) -> None:
        self.new_worker, self.redis_up, self.stopping = new_worker, redis_up, stopping
        self.burst, self.restart_wait_s = burst, restart_wait_s
        self._horse = 0

    @property
    def horse(self) -> int:
        """The pid of a work horse left running by a worker that ended mid-job (0: none)."""
        return self._horse

    def run(self) -> None:
        before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        self._catch_stop_signals()  # RQ's own while a worker works; a stop before the first one ends the loop
        try:
            while not self.stopping.is_set() and self._redis_answers():
                worker = self._work_once()
                if worker is not None:
                    self._let_go(worker)
                if not self.stopping.is_set():
                    self.stopping.wait(self.restart_wait_s)
        finally:
            for sig, handler in before.items():
                if handler is not None:
                    signal.signal(sig, handler)

    def _redis_answers(self) -> bool:
        """Waits for Redis (jobs requested meanwhile wait in SQL, queued); False: a stop was asked first."""
        if self.redis_up():
            return True
        log.warning("Redis is unreachable; the worker starts once it is back")
        while not self.stopping.wait(self.restart_wait_s):
            if self.redis_up():
                return True
        return False

    def _work_once(self) -> Any:
        """One RQ worker's run; returns the worker (None: it could not be made). Nothing is raised."""
        worker = None
        try:
            worker = self.new_worker()
            worker.work(burst=self.burst, with_scheduler=False)
            ended = "without a stop being asked (RQ gave up on an error)"
        except Exception as exc:
            ended = f"on an error ({safe_error_text(exc)})"
        self._horse = worker.horse_pid if worker is not None else 0  # RQ resets it once it has reaped the horse
        self._catch_stop_signals()  # RQ's handlers outlive its loop: from here a stop must reach the horse it left
        if not self.stopping.is_set():
            log.warning("the RQ worker ended %s; a fresh one starts", ended)
        return worker

    def _let_go(self, worker: Any) -> None:
        """Waits for the horse the worker left (if any) to end, reaps it, and closes the worker's connection."""
        if pid := self._horse:
            log.warning("work horse %d still runs its job: the next worker starts once it has ended", pid)
            with contextlib.suppress(ChildProcessError):
                # Waited for, then reaped: a stop signal meanwhile may name it, and its pid is not reused before.
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                self._horse = 0
                _, status = os.waitpid(pid, 0)
                log.warning("work horse %d ended (exit code %d)", pid, os.waitstatus_to_exitcode(status))
            self._horse = 0
        try:
            worker.connection.close()
        except Exception as exc:
            log.debug("closing the RQ worker's connection failed: %s", type(exc).__name__)

    def _catch_stop_signals(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, _signum: int, _frame: FrameType | None) -> None:
        """A stop signal while no RQ worker holds the signals: the horse left running (if any) is told to stop
        its job, and the loop ends once it has; a second signal is a cold stop, as RQ's: the horse is killed."""
        if self.stopping.is_set():
            if pid := self._horse:
                _signal(pid, signal.SIGKILL, group=True)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            raise SystemExit()
        self.stopping.set()
        if self._horse:
            _signal(self._horse, STOP_JOB_SIGNAL)


def _signal(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    """Signals a work horse (`group`: its process group, which it leads), unless it has just ended."""
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def run_worker(settings: Settings, ctx: JobContext, *, burst: bool = False) -> None:
    queue = ctx.queue
    if not isinstance(queue, RedisJobQueue):
        raise SystemExit("oppu worker needs OPPU_REDIS_URL (the embedded default runs jobs in the API)")
    stop = threading.Event()
    threading.Thread(target=run_reaper, args=(settings, ctx, stop), name="oppu-reaper", daemon=True).start()
    # Import the training libraries once in the parent (CPU-only imports, no CUDA init): each forked
    # work horse then starts training without paying seconds of imports.
    import peft  # noqa: F401
    import transformers  # noqa: F401

    stopping = threading.Event()  # a stop signal, or a burst done: the only ways out of the loop
    try:
        WorkerLoop(rq_workers(queue, stopping), queue.ping, stopping, burst=burst).run()
    finally:
        stop.set()
