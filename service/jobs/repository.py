"""ALL SQL for training jobs, and the ONE writer of a job's state. Owner first where a job belongs to one;
nothing commits.

A job row is the truth of a training job (the queue only carries its id). At most one active
(queued/running) job per owner: a partial unique index, so concurrent requests make exactly one job.
Every state change is a compare-and-set UPDATE that names the state (and, for a running job, the attempt)
it leaves: a superseded attempt, a reaper on another process or a cancel can never be overwritten by a
late writer. States: queued -> running -> succeeded | failed; running -> queued (retry, stale takeover);
queued | running -> cancelled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, inspect, select, true, update
from sqlalchemy.orm import Session

from service.db.insert import insert_or_nothing
from service.db.models import ACTIVE_JOB_STATES, Job

MAX_JOB_ID = 36


def active(session: Session, owner_key: str) -> Job | None:
    return session.execute(
        select(Job).where(Job.owner_key == owner_key, Job.status.in_(ACTIVE_JOB_STATES))
    ).scalar_one_or_none()


def add_unless_active(session: Session, job: Job) -> Job:
    """Insert the (transient) job and return it as stored, or return the owner's active job when another request
    holds the one-active-job index. IntegrityError: the owner's user row is gone. The insert skips a taken key
    instead of failing, so SQLite needs no SAVEPOINT (which could commit the job outside the caller's unit of
    work); PostgreSQL keeps one so that a gone user leaves the caller's transaction usable (a bulk retrain goes
    on with the other owners)."""
    values = {a.key: getattr(job, a.key) for a in inspect(Job).column_attrs if getattr(job, a.key) is not None}
    stmt = insert_or_nothing(session, Job, ["owner_key"], Job.status.in_(ACTIVE_JOB_STATES))
    while True:
        with session.begin_nested() if session.get_bind().dialect.name == "postgresql" else nullcontext():
            inserted = session.execute(stmt.returning(Job.id), values).scalar_one_or_none() is not None
        stored = get(session, job.id) if inserted else active(session, job.owner_key)
        if stored is not None:
            return stored
        # The active job that took the index ended between the insert and the read: try again.


def last_succeeded_at(session: Session, owner_key: str, kind: str) -> datetime | None:
    """When the owner's latest job of this kind that succeeded finished (None: none kept)."""
    stmt = select(func.max(Job.finished_at)).where(
        Job.owner_key == owner_key, Job.kind == kind, Job.status == "succeeded"
    )
    return session.scalar(stmt)


def _may_be_job_id(job_id: str) -> bool:
    """Job ids are uuid4 text: anything else names no job (and a NUL byte would be refused by PostgreSQL)."""
    return len(job_id) <= MAX_JOB_ID and "\x00" not in job_id


def get(session: Session, job_id: str) -> Job | None:
    """By the job's own id (a random uuid: knowing it is the capability; admin routes only)."""
    return session.get(Job, job_id, populate_existing=True) if _may_be_job_id(job_id) else None


def get_owned(session: Session, owner_key: str, job_id: str) -> Job | None:
    """The owner's job by id; another owner's job is None, as no job is (the user route's 404 tells nothing)."""
    if not _may_be_job_id(job_id):
        return None
    return session.execute(
        select(Job).where(Job.owner_key == owner_key, Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def _cas(session: Session, job_id: str, where: ColumnElement[bool], **values: Any) -> bool:
    """THE state write: only a row matching `where` changes; True if it did."""
    result = session.execute(
        update(Job).where(Job.id == job_id, where).values(**values).execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def _owned(attempt: int | None) -> ColumnElement[bool]:
    """A running job still owned by this attempt (None: by whichever attempt runs it)."""
    return (Job.status == "running") & ((Job.attempts == attempt) if attempt is not None else true())


def claim(session: Session, job_id: str, now: datetime, stale_before: datetime) -> bool:
    """queued -> running (attempts + 1); also takes over a running job whose heartbeat is older than
    stale_before. True if this caller now owns the job."""
    return _cas(
        session,
        job_id,
        (Job.status == "queued") | ((Job.status == "running") & (Job.heartbeat_at < stale_before)),
        status="running",
        attempts=Job.attempts + 1,
        started_at=now,
        heartbeat_at=now,
        error=None,
    )


def heartbeat(session: Session, job_id: str, progress: float, now: datetime, attempt: int | None) -> bool:
    """Only the attempt that owns the job (when given) refreshes it: a superseded one must not. False: this
    attempt no longer owns the job (taken over, cancelled, or its owner erased and the row gone)."""
    return _cas(session, job_id, _owned(attempt), progress=progress, heartbeat_at=now)


def mark_succeeded(
    session: Session, job_id: str, attempt: int | None, adapter_version: int | None, now: datetime
) -> bool:
    return _cas(
        session,
        job_id,
        _owned(attempt),
        status="succeeded",
        progress=1.0,
        adapter_version=adapter_version,
        finished_at=now,
    )


def requeue(session: Session, job_id: str, attempt: int | None, error: str | None, now: datetime) -> bool:
    """running -> queued, for the next attempt (a retry after an error; start-up recovery)."""
    return _cas(session, job_id, _owned(attempt), status="queued", error=error, requeued_at=now)


def give_back(session: Session, job_id: str, attempt: int, now: datetime) -> bool:
    """running -> queued with this attempt not counted: a shutdown stopped it, it did not fail."""
    return _cas(session, job_id, _owned(attempt), status="queued", attempts=Job.attempts - 1, requeued_at=now)


def mark_failed(session: Session, job_id: str, attempt: int | None, error: str, now: datetime) -> bool:
    return _cas(session, job_id, _owned(attempt), status="failed", error=error, finished_at=now)


def _stale(attempt: int, stale_before: datetime) -> ColumnElement[bool]:
    """Still that attempt and still without a heartbeat since `stale_before` (one that landed: its worker lives)."""
    return _owned(attempt) & (Job.heartbeat_at < stale_before)


def fail_stale(session: Session, job_id: str, attempt: int, error: str, stale_before: datetime, now: datetime) -> bool:
    """The reaper's end of a job whose worker died on its last attempt: failed, only while _stale."""
    return _cas(session, job_id, _stale(attempt, stale_before), status="failed", error=error, finished_at=now)


def requeue_stale(session: Session, job_id: str, attempt: int, stale_before: datetime, now: datetime) -> bool:
    """The reaper's takeover of a running job whose worker died: back to queued (marked, so the next tick
    does not enqueue it again), only while _stale."""
    return _cas(session, job_id, _stale(attempt, stale_before), status="queued", requeued_at=now)


def touch_queued(session: Session, job_id: str, requeue_before: datetime, now: datetime) -> bool:
    """A queued job last put on the queue before `requeue_before` (its message may be lost: Redis was down at
    the enqueue, or restarted empty) is marked as re-enqueued now; True: the caller enqueues it again."""
    last = func.coalesce(Job.requeued_at, Job.created_at)
    return _cas(session, job_id, (Job.status == "queued") & (last < requeue_before), requeued_at=now)


def cancel(session: Session, job_id: str, now: datetime) -> bool:
    """queued | running -> cancelled: a running attempt finds out at its next heartbeat or at publish."""
    return _cas(session, job_id, Job.status.in_(ACTIVE_JOB_STATES), status="cancelled", finished_at=now)


def stale_running(session: Session, stale_before: datetime) -> list[tuple[str, int]]:
    """(id, attempts) of running jobs whose worker stopped heart-beating (the reaper: all owners)."""
    rows = session.execute(select(Job.id, Job.attempts).where(Job.status == "running", Job.heartbeat_at < stale_before))
    return [(job_id, attempts) for job_id, attempts in rows]


def queued_before(session: Session, requeue_before: datetime) -> list[tuple[str, int]]:
    """(id, attempts) of queued jobs last put on the queue before `requeue_before` (the reaper: all owners)."""
    last = func.coalesce(Job.requeued_at, Job.created_at)
    rows = session.execute(select(Job.id, Job.attempts).where(Job.status == "queued", last < requeue_before))
    return [(job_id, attempts) for job_id, attempts in rows]


def unfinished(session: Session) -> list[tuple[str, int, str]]:
    """(id, attempts, status) of every queued or running job (embedded start-up recovery: this process's)."""
    rows = session.execute(select(Job.id, Job.attempts, Job.status).where(Job.status.in_(ACTIVE_JOB_STATES)))
    return [(job_id, attempts, status) for job_id, attempts, status in rows]


def delete_finished_before(session: Session, before: datetime, limit: int) -> int:
    """Deletes up to `limit` finished jobs (all owners: the reaper) that finished before `before`, oldest first;
    returns how many. Bounded, so one pass holds its locks briefly however many have piled up."""
    finished = Job.status.not_in(ACTIVE_JOB_STATES) & (Job.finished_at < before)
    ids = list(session.scalars(select(Job.id).where(finished).order_by(Job.finished_at).limit(limit)))
    if not ids:
        return 0
    session.execute(delete(Job).where(Job.id.in_(ids), finished))
    return len(ids)


def count_by_status(session: Session) -> dict[str, int]:
    return {status: int(n) for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}


def mean_durations(session: Session) -> dict[str, float]:
    """Mean seconds from start to finish of the finished jobs, by outcome: one aggregate in SQL (every finished
    row was read into Python at each /metrics scrape, and jobs are kept until their owner is erased)."""
    if session.get_bind().dialect.name == "postgresql":
        seconds: Any = func.extract("epoch", Job.finished_at - Job.started_at)
    else:  # SQLite keeps datetimes as text: julianday() reads them (days)
        seconds = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    rows = session.execute(
        select(Job.status, func.avg(seconds))
        .where(Job.finished_at.is_not(None), Job.started_at.is_not(None))
        .group_by(Job.status)
    )
    return {status: float(mean) for status, mean in rows if mean is not None}


def iter_of_owner(session: Session, owner_key: str, *, page: int = 500) -> Iterator[tuple[Any, ...]]:
    """Every job of one owner, oldest first, as (id, kind, status, adapter_version, error, created_at,
    finished_at) rows read a page at a time (the user's export: finished jobs are kept for OPPU_JOB_KEEP_S, and
    an owner rotating their data key in a loop makes ~10k a day)."""
    columns = (Job.id, Job.kind, Job.status, Job.adapter_version, Job.error, Job.created_at, Job.finished_at)
    stmt = select(*columns).where(Job.owner_key == owner_key).order_by(Job.created_at, Job.id)
    for row in session.execute(stmt.execution_options(yield_per=page)):
        yield tuple(row)
