"""ALL SQL for training jobs. Owner first where a job belongs to one; nothing commits.

A job row is the truth of a training job (the queue only carries its id). At most one active
(queued/running) job per owner: a partial unique index, so concurrent requests make exactly one job.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, func, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ACTIVE_JOB_STATES, Job

MAX_JOB_ID = 36


def active(session: Session, owner_key: str) -> Job | None:
    return session.execute(
        select(Job).where(Job.owner_key == owner_key, Job.status.in_(ACTIVE_JOB_STATES))
    ).scalar_one_or_none()


def add_unless_active(session: Session, job: Job) -> Job:
    """Insert the job, or return the owner's active one when a concurrent request won the race."""
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        existing = active(session, job.owner_key)
        if existing is None:
            raise
        return existing
    return job


def get(session: Session, job_id: str) -> Job | None:
    """By the job's own id (a random uuid: knowing it is the capability; admin routes only)."""
    return session.get(Job, job_id, populate_existing=True) if len(job_id) <= MAX_JOB_ID else None


def claim(session: Session, job_id: str, now: datetime, stale_before: datetime) -> bool:
    """queued -> running (attempts + 1); also takes over a running job whose heartbeat is older than
    stale_before. True if this caller now owns the job."""
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            (Job.status == "queued") | ((Job.status == "running") & (Job.heartbeat_at < stale_before)),
        )
        .values(status="running", attempts=Job.attempts + 1, started_at=now, heartbeat_at=now, error=None)
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def heartbeat(session: Session, job_id: str, progress: float, now: datetime, attempt: int | None) -> None:
    """Only the attempt that owns the job (when given) refreshes it: a superseded one must not."""
    owned: ColumnElement[bool] = (Job.attempts == attempt) if attempt is not None else true()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", owned)
        .values(progress=progress, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )


def mark_succeeded(session: Session, job_id: str, adapter_version: int | None, now: datetime) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(status="succeeded", progress=1.0, adapter_version=adapter_version, finished_at=now)
        .execution_options(synchronize_session=False)
    )


def stale_running(session: Session, stale_before: datetime) -> list[Job]:
    """Running jobs whose worker stopped heart-beating (admin/reaper: all owners)."""
    return list(session.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < stale_before)))


def unfinished(session: Session) -> list[Job]:
    """Every queued or running job (embedded start-up recovery: all owners of this one process)."""
    return list(session.scalars(select(Job).where(Job.status.in_(ACTIVE_JOB_STATES))))


def count_by_status(session: Session) -> dict[str, int]:
    return {status: int(n) for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}


def finished_durations(session: Session) -> dict[str, list[float]]:
    """Seconds from start to finish of every finished job, by outcome."""
    rows = session.execute(
        select(Job.status, Job.started_at, Job.finished_at).where(Job.finished_at.is_not(None))
    ).all()
    out: dict[str, list[float]] = {}
    for status, started, finished in rows:
        if started is not None and finished is not None:
            out.setdefault(status, []).append((finished - started).total_seconds())
    return out
