"""The RQ entry point: the function path every queue message names (`service.jobs.entry.run_job_in_worker`).
It runs in an RQ work horse, forked from `oppu worker`, which installs the factory of the job context
(the composition root's) before it starts: this module never imports the composition root. Each work horse
builds its own context once (its own database pool: connections are never shared across a fork)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from service.jobs.context import JobContext
from service.jobs.tasks import run_job

ContextFactory = Callable[[], JobContext]

_factory: ContextFactory | None = None
_ctx: JobContext | None = None
_stopping = threading.Event()  # this work horse's worker was asked to stop (service/jobs/worker.py)


def install(factory: ContextFactory) -> None:
    """Called by the worker process before it forks work horses."""
    global _factory, _ctx
    _factory, _ctx = factory, None


def stop_running_job() -> None:
    """The work horse's stop signal: its job stops at its next progress check and gives its attempt back."""
    _stopping.set()
    if _ctx is not None:
        _ctx.stopping.set()


def run_job_in_worker(job_id: str) -> None:
    global _ctx
    if _ctx is None:
        if _factory is None:
            raise RuntimeError("no job context factory installed: run the worker with `oppu worker`")
        _ctx = _factory()
    if _stopping.is_set():  # asked to stop before the context existed
        _ctx.stopping.set()
    run_job(_ctx, job_id)
