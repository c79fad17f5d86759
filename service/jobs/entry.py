"""The RQ entry point: the function path every queue message names (`service.jobs.entry.run_job_in_worker`).
It runs in an RQ work horse, forked from `oppu worker`, which installs the factory of the job context
(the composition root's) before it starts: this module never imports the composition root. Each work horse
builds its own context once (its own database pool: connections are never shared across a fork)."""

from __future__ import annotations

from collections.abc import Callable

from service.jobs.context import JobContext
from service.jobs.tasks import run_job

ContextFactory = Callable[[], JobContext]

_factory: ContextFactory | None = None
_ctx: JobContext | None = None


def install(factory: ContextFactory) -> None:
    """Called by the worker process before it forks work horses."""
    global _factory, _ctx
    _factory, _ctx = factory, None


def run_job_in_worker(job_id: str) -> None:
    global _ctx
    if _ctx is None:
        if _factory is None:
            raise RuntimeError("no job context factory installed: run the worker with `oppu worker`")
        _ctx = _factory()
    run_job(_ctx, job_id)
