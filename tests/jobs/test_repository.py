"""jobs/repository's job creation and aggregates, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db.models import Job
from service.db.session import make_engine, make_session_factory
from service.jobs import repository as repo
from service.jobs import service
from service.jobs.queue import NoQueue
from service.jobs.schemas import JobOut


def test_mean_durations_are_computed_in_sql_by_outcome(db_url: str) -> None:
    engine = make_engine(db_url)
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    with make_session_factory(engine)() as session:
        for status, seconds in (("succeeded", 10.0), ("succeeded", 30.0), ("failed", 4.5)):
            session.add(
                Job(
                    id=str(uuid.uuid4()), kind="user_retrain", owner_key=uuid.uuid4().hex, status=status,
                    progress=1.0, attempts=1, created_at=start, started_at=start,
                    finished_at=start + timedelta(seconds=seconds),
                )
            )  # fmt: skip
        session.add(Job(id=str(uuid.uuid4()), kind="user_retrain", owner_key="q", status="queued", created_at=start))
        session.commit()
        means = repo.mean_durations(session)
    engine.dispose()
    assert means.keys() == {"succeeded", "failed"}
    assert means["succeeded"] == pytest.approx(20.0, abs=1e-3) and means["failed"] == pytest.approx(4.5, abs=1e-3)


def test_finished_jobs_past_the_keep_time_are_deleted_in_bounded_batches(db_url: str) -> None:
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=40), now - timedelta(days=1)

    def job(status: str, finished: datetime | None) -> Job:
        return Job(
            id=str(uuid.uuid4()), kind="user_retrain", owner_key=uuid.uuid4().hex, status=status, created_at=old,
            started_at=old, finished_at=finished,
        )  # fmt: skip

    with make_session_factory(engine)() as session:
        doomed = [job(s, old) for s in ("succeeded", "failed", "cancelled", "succeeded", "failed")]
        kept = [job("succeeded", recent), job("queued", None), job("running", None)]
        session.add_all(doomed + kept)
        session.commit()
        assert service.prune_finished(session, keep_s=30 * 86400) == 5  # below one batch
        session.commit()
        left = set(session.scalars(select(Job.id)))
        assert left == {j.id for j in kept}
        assert repo.delete_finished_before(session, now, limit=0) == 0
        assert repo.delete_finished_before(session, now, limit=1) == 1  # the batch bounds one pass
        session.commit()
        assert set(session.scalars(select(Job.id))) == {kept[1].id, kept[2].id}  # never an active job
    engine.dispose()


def _request(session: Session, owner_key: str, user_pk: int | None = None) -> tuple[JobOut, bool]:
    return service.request_job(session, NoQueue(), "user_retrain", owner_key, user_pk)


def test_a_rolled_back_request_leaves_no_job(db_url: str) -> None:
    # SQLite: the job's insert sat in a SAVEPOINT that was the transaction's first statement (pysqlite begins
    # only before DML), so releasing it committed the job at once: a request that failed after it left a queued
    # job that the reaper later ran.
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as session:
        job, created = _request(session, "owner-a")
        assert created and job.status == "queued"
        session.rollback()
    with factory() as session:
        assert session.scalars(select(Job)).all() == []
    engine.dispose()


def test_an_insert_meeting_the_active_job_returns_it_and_a_finished_job_does_not_block(db_url: str) -> None:
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as session:
        first, _ = _request(session, "owner-a")
        assert _request(session, "owner-b")[0].job_id != first.job_id
        session.commit()
    with factory() as session:  # a request that looked before the first one committed
        late = Job(id=str(uuid.uuid4()), kind="user_retrain", owner_key="owner-a", status="queued")
        assert repo.add_unless_active(session, late).id == first.job_id
        session.execute(update(Job).where(Job.id == first.job_id).values(status="succeeded"))
        assert repo.add_unless_active(session, late).id == late.id
        session.commit()
    with factory() as session:
        assert repo.active(session, "owner-a") is not None and len(session.scalars(select(Job)).all()) == 3
    engine.dispose()


def test_a_bulk_retrain_skips_a_user_erased_meanwhile_and_goes_on(db_url: str) -> None:
    # PostgreSQL: the erased user's foreign key fails the insert; without a savepoint the whole transaction
    # would be aborted and the next owner's job could not be made.
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as session:
        jobs, skipped = service.request_retrains(session, NoQueue(), [("gone", 999_999), ("next", None)])
        assert skipped == 1 and len(jobs) == 1
        session.commit()
    with factory() as session:
        assert [j.owner_key for j in session.scalars(select(Job))] == ["next"]
    engine.dispose()
