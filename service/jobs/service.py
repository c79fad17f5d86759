"""Job use cases: request (deduplicated in SQL), read, and the state transitions job bodies use.
Services never commit; enqueueing happens after the commit."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ACTIVE_JOB_STATES, Job
from service.db.session import after_commit
from service.errors import NotFound
from service.history import repository as history_repo
from service.jobs.queue import JobQueue
from service.jobs.schemas import JobOut

Kind = Literal["user_retrain", "shared_retrain"]


def to_out(job: Job) -> JobOut:
    return JobOut(
        job_id=job.id,
        kind=job.kind,
        status=job.status,  # type: ignore[arg-type]
        progress=round(job.progress, 4),
        adapter_version=job.adapter_version,
        error=job.error,
        attempts=job.attempts,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


def active_job(session: Session, owner_key: str) -> Job | None:
    return session.execute(
        select(Job).where(Job.owner_key == owner_key, Job.status.in_(ACTIVE_JOB_STATES))
    ).scalar_one_or_none()


def request_job(
    session: Session, queue: JobQueue, kind: Kind, owner_key: str, user_pk: int | None
) -> tuple[JobOut, bool]:
    """The owner's active job if there is one, else a new queued job. Dedupe is a partial unique
    index in SQL, so concurrent requests (any replica) produce exactly one job."""
    existing = active_job(session, owner_key)
    if existing is not None:
        return to_out(existing), False
    cutoff = history_repo.max_item_id(session, user_pk) if user_pk is not None else None
    job = Job(
        id=str(uuid.uuid4()),
        kind=kind,
        owner_key=owner_key,
        user_pk=user_pk,
        status="queued",
        progress=0.0,
        attempts=0,
        cutoff_item_id=cutoff,
        created_at=datetime.now(UTC),
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        existing = active_job(session, owner_key)
        if existing is None:
            raise
        return to_out(existing), False
    job_id = job.id
    after_commit(session, lambda: queue.enqueue(job_id, 1))
    return to_out(job), True


def get(session: Session, job_id: str) -> JobOut:
    job = session.get(Job, job_id) if len(job_id) <= 36 else None
    if job is None:
        raise NotFound("no such job")
    return to_out(job)


# --- transitions used by job bodies (each in its own short unit of work) ---


def claim(session: Session, job_id: str, stale_after_s: float) -> Job | None:
    """queued -> running (attempts + 1); also takes over a running job whose heartbeat is stale."""
    now = datetime.now(UTC)
    stale = now - timedelta(seconds=stale_after_s)
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            (Job.status == "queued") | ((Job.status == "running") & (Job.heartbeat_at < stale)),
        )
        .values(status="running", attempts=Job.attempts + 1, started_at=now, heartbeat_at=now, error=None)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def heartbeat(session: Session, job_id: str, progress: float, *, attempt: int | None = None) -> None:
    """Only the attempt that owns the job (when given) refreshes it: a superseded one must not."""
    owned = (Job.attempts == attempt) if attempt is not None else true()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", owned)
        .values(progress=progress, heartbeat_at=datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )


def finish(session: Session, job_id: str, *, adapter_version: int | None) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(status="succeeded", progress=1.0, adapter_version=adapter_version, finished_at=datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )


def fail_or_retry(session: Session, job_id: str, error: str, max_attempts: int, *, attempt: int | None = None) -> bool:
    """Returns True when the job goes back to the queue (the caller enqueues after commit). Only a
    running job changes, and with `attempt` only while that attempt still owns it: a superseded attempt
    that fails must not turn a job another attempt finished (or took over) back into queued/failed."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != "running" or (attempt is not None and job.attempts != attempt):
        return False
    retry = job.attempts < max_attempts
    job.status = "queued" if retry else "failed"
    job.error = error[:2000]
    if not retry:
        job.finished_at = datetime.now(UTC)
    session.flush()
    return retry


def stale_running(session: Session, stale_after_s: float) -> list[Job]:
    stale = datetime.now(UTC) - timedelta(seconds=stale_after_s)
    return list(session.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < stale)))


def maybe_auto_retrain(session: Session, queue: JobQueue, user_pk: int, owner_key: str, threshold: int) -> bool:
    """Behaviour shift: enqueue a retrain once the user has `threshold` items past their adapter's cutoff."""
    from service.adapters import repository as adapter_repo

    current = adapter_repo.current(session, owner_key)
    cutoff = (current.meta or {}).get("cutoff_item_id") if current is not None else None
    newer = history_repo.count_items_after(session, user_pk, int(cutoff) if cutoff is not None else 0)
    if newer < threshold or active_job(session, owner_key) is not None:
        return False
    request_job(session, queue, "user_retrain", owner_key, user_pk)
    return True
