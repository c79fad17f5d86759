"""Job use cases: request (deduplicated in SQL), read, and the state transitions job bodies use.
Services never commit; enqueueing happens after the commit."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.adapters import repository as adapter_repo
from service.db.models import SHARED_OWNER, Job
from service.db.session import after_commit
from service.errors import Conflict, NotFound, TooManyRequests
from service.history import repository as history_repo
from service.jobs import repository as repo
from service.jobs.queue import JobQueue
from service.jobs.schemas import JobOut, as_utc
from service.sealing.session import sealer_of

Kind = Literal["user_retrain", "shared_retrain", "user_key_rotation"]
KEY_ROTATION: Kind = "user_key_rotation"
MAX_ERROR_CHARS = 2000


class OtherJobActive(Conflict):
    """The owner has an active job of another kind (one active job per owner): this one is not made."""

    code = "job_active"


class NoHistory(Conflict):
    """A user retrain asked for a user with no history: there is nothing to train on (a job would fail)."""

    code = "no_history"


class SealingOff(Conflict):
    """A data-key rotation asked of a server that does not seal (OPPU_SEAL_AT_REST=false)."""

    code = "sealing_off"


def to_out(job: Job) -> JobOut:
    return JobOut(
        job_id=job.id,
        kind=job.kind,
        status=job.status,  # one of JobStatus: only repository.py writes it
        progress=round(job.progress, 4),
        adapter_version=job.adapter_version,
        error=job.error,
        attempts=job.attempts,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


def request_job(
    session: Session, queue: JobQueue, kind: Kind, owner_key: str, user_pk: int | None, *, require_history: bool = False
) -> tuple[JobOut, bool]:
    """The owner's active job if there is one, else a new queued job. Dedupe is a partial unique
    index in SQL, so concurrent requests (any replica) produce exactly one job. A key rotation is never
    answered with another kind of job: OtherJobActive (409) names the active one instead."""
    existing = repo.active(session, owner_key)
    if existing is not None:
        return _same_kind(existing, kind), False
    training = kind != KEY_ROTATION
    cutoff = history_repo.max_item_id(session, user_pk) if user_pk is not None and training else None
    if require_history and training and user_pk is not None and cutoff is None:
        raise NoHistory("this user has no history to train on; add items first (POST /users/{id}/history)")
    job = Job(
        id=str(uuid.uuid4()),
        kind=kind,
        owner_key=owner_key,
        user_pk=user_pk,
        status="queued",
        progress=0.0,
        attempts=0,
        cutoff_item_id=cutoff,
        created_at=_now(),
        requeued_at=_now(),
    )
    try:
        stored = repo.add_unless_active(session, job)
    except IntegrityError as exc:
        if user_pk is None:
            raise
        raise NotFound("this user no longer exists") from exc  # erased after the caller was resolved
    if stored.id != job.id:
        return _same_kind(stored, kind), False
    job_id = job.id
    after_commit(session, lambda: queue.enqueue(job_id, 1))
    return to_out(stored), True


def request_retrains(
    session: Session, queue: JobQueue, owners: Sequence[tuple[str, int | None]]
) -> tuple[list[JobOut], int]:
    """A user retrain for each (owner, user pk), or their active one; owners with another kind of job active or
    erased meanwhile are skipped: (jobs, how many skipped)."""
    jobs, skipped = [], 0
    for owner_key, user_pk in owners:
        try:
            jobs.append(request_job(session, queue, "user_retrain", owner_key, user_pk)[0])
        except (OtherJobActive, NotFound):
            skipped += 1
    return jobs, skipped


def _same_kind(active: Job, kind: Kind) -> JobOut:
    """The active job answers a request for the same kind; a key rotation and a retrain never answer for each
    other (the caller would poll a job that does not do what it asked): 409 naming the active one."""
    if active.kind != kind:
        out = to_out(active)
        asked = "rotate the data key" if kind == KEY_ROTATION else "retrain"
        raise OtherJobActive(
            f"this user has an active {out.kind} job ({out.job_id}, {out.status}); {asked} once it has finished",
            details={"active_job": out.model_dump(mode="json")},
        )
    return to_out(active)


def request_key_rotation(
    session: Session, queue: JobQueue, owner_key: str, user_pk: int, *, min_interval_s: float = 0.0
) -> JobOut:
    """A background rotation of the user's data key (job kind `user_key_rotation`; its body is
    `sealing.operations.rotate_user`); the active one if one is under way. `min_interval_s` (the owner's own
    route): a new one only that long after the last that succeeded, else 429 with Retry-After (each rotation
    re-seals all of the user's data on a shared worker, and its job row is kept OPPU_JOB_KEEP_S)."""
    if not sealer_of(session).enabled:
        raise SealingOff("this server does not seal data at rest (OPPU_SEAL_AT_REST=false): no data key to rotate")
    if min_interval_s > 0 and repo.active(session, owner_key) is None:
        last = repo.last_succeeded_at(session, owner_key, KEY_ROTATION)
        wait = min_interval_s - (_now() - as_utc(last)).total_seconds() if last is not None else 0.0
        if wait > 0:
            raise TooManyRequests(
                f"this user's data key was rotated less than {min_interval_s:g} s ago; retry later",
                headers={"Retry-After": str(math.ceil(wait))},
            )
    job, _created = request_job(session, queue, KEY_ROTATION, owner_key, user_pk)
    return job



def shared_retrainer(queue: JobQueue) -> Callable[[Session], object]:
    """How an erase (OPPU_SHARED_ON_ERASE=retrain) requests a shared retrain in its own transaction."""
    return lambda session: request_job(session, queue, "shared_retrain", SHARED_OWNER, None)


def get(session: Session, job_id: str) -> JobOut:
    job = repo.get(session, job_id)
    if job is None:
        raise NotFound("no such job")
    return to_out(job)


def get_owned(session: Session, owner_key: str, job_id: str) -> JobOut:
    """A job of the owner's (their retrain, their data-key rotation); 404 for another owner's as for none."""
    job = repo.get_owned(session, owner_key, job_id)
    if job is None:
        raise NotFound("no such job")
    return to_out(job)


# --- transitions used by job bodies and the reaper (each in its own short unit of work; the SQL is in
# repository.py, every one a compare-and-set) ---


def _now() -> datetime:
    return datetime.now(UTC)


def _before(seconds: float) -> datetime:
    return _now() - timedelta(seconds=seconds)


def claim(session: Session, job_id: str, stale_after_s: float) -> Job | None:
    """queued -> running (attempts + 1); also takes over a running job whose heartbeat is stale."""
    if not repo.claim(session, job_id, _now(), _before(stale_after_s)):
        return None
    return repo.get(session, job_id)


def heartbeat(session: Session, job_id: str, progress: float, *, attempt: int | None = None) -> bool:
    """False: this attempt no longer owns the job (taken over, cancelled, or gone with its erased owner)."""
    return repo.heartbeat(session, job_id, progress, _now(), attempt)


def finish(session: Session, job_id: str, *, adapter_version: int | None, attempt: int | None = None) -> bool:
    return repo.mark_succeeded(session, job_id, attempt, adapter_version, _now())


def fail_or_retry(session: Session, job_id: str, error: str, max_attempts: int, *, attempt: int | None = None) -> bool:
    """Returns True when the job goes back to the queue (the caller enqueues after commit). Only a
    running job changes, and with `attempt` only while that attempt still owns it: a superseded attempt
    that fails must not turn a job another attempt finished (or took over) back into queued/failed."""
    job = repo.get(session, job_id)
    if job is None or job.status != "running" or (attempt is not None and job.attempts != attempt):
        return False
    seen, error = job.attempts, error[:MAX_ERROR_CHARS]
    if seen < max_attempts:
        return repo.requeue(session, job_id, seen, error, _now())
    repo.mark_failed(session, job_id, seen, error, _now())
    return False


def cancel(session: Session, job_id: str) -> JobOut:
    """An active job ends as cancelled (a running attempt publishes nothing); a finished one is left as is."""
    if repo.get(session, job_id) is None:
        raise NotFound("no such job")
    repo.cancel(session, job_id, _now())
    return get(session, job_id)


def requeue_stale(
    session: Session, stale_after_s: float, max_attempts: int, error: str = "worker died too many times"
) -> tuple[list[tuple[str, int]], int]:
    """Running jobs whose worker stopped heart-beating: back to queued (marked; the caller enqueues each
    (id, attempt) returned after the commit), or failed with `error` past max attempts (counted)."""
    now, stale_before, out, failed = _now(), _before(stale_after_s), [], 0
    for job_id, attempts in repo.stale_running(session, stale_before):
        if attempts >= max_attempts:
            failed += repo.fail_stale(session, job_id, attempts, error, stale_before, now)
        elif repo.requeue_stale(session, job_id, attempts, stale_before, now):
            out.append((job_id, attempts + 1))
    return out, failed


def requeue_lost(session: Session, requeue_after_s: float) -> list[tuple[str, int]]:
    """Queued jobs put on the queue more than `requeue_after_s` ago (the message may be lost: Redis was down at
    the enqueue, or restarted empty): marked as re-enqueued now; the caller enqueues each after the commit."""
    now, before = _now(), _before(requeue_after_s)
    return [(i, a + 1) for i, a in repo.queued_before(session, before) if repo.touch_queued(session, i, before, now)]


PRUNE_BATCH = 500  # finished jobs deleted per reaper pass


def prune_finished(session: Session, keep_s: float) -> int:
    """Finished jobs older than `keep_s` (OPPU_JOB_KEEP_S) go: the table, the reaper's scans and the metrics'
    aggregates stay bounded (a job row was kept until its owner was erased; shared-LoRA jobs for ever)."""
    return repo.delete_finished_before(session, _before(keep_s), PRUNE_BATCH)


def requeue_unfinished(session: Session, stale_after_s: float, max_attempts: int) -> list[tuple[str, int]]:
    """Embedded start-up: queued jobs are enqueued again (the in-process queue died with the last run); a running
    job whose heartbeat went stale is taken over as the reaper does, except on its last attempt: failed (an attempt
    that kills the process, e.g. out of memory, would otherwise be retried at every start: a crash loop). A running
    job that still beats is another live process's (`oppu keys rotate-user`, `oppu train`, a second replica
    without Redis): left to it, and to the reaper if that process stops."""
    queued = [(job_id, attempts + 1) for job_id, attempts, status in repo.unfinished(session) if status == "queued"]
    taken_over, _ = requeue_stale(session, stale_after_s, max_attempts, "the process died during its last attempt")
    return queued + taken_over


def stopped(session: Session, job_id: str, attempt: int) -> bool:
    """A shutdown stopped this attempt: the job goes back to queued and the attempt is not counted."""
    return repo.give_back(session, job_id, attempt, _now())


def maybe_auto_retrain(session: Session, queue: JobQueue, user_pk: int, owner_key: str, threshold: int) -> bool:
    """Behaviour shift: enqueue a retrain once the user has `threshold` items past their adapter's cutoff."""
    current = adapter_repo.current(session, owner_key)
    cutoff = (current.meta or {}).get("cutoff_item_id") if current is not None else None
    newer = history_repo.count_items_after(session, user_pk, int(cutoff) if cutoff is not None else 0)
    if newer < threshold or repo.active(session, owner_key) is not None:
        return False
    try:
        request_job(session, queue, "user_retrain", owner_key, user_pk)
    except OtherJobActive:  # a key rotation queued meanwhile: the append stands, the next one asks again
        return False
    return True
