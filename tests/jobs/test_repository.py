"""jobs/repository's aggregates, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from service.db.models import Job
from service.db.session import make_engine, make_session_factory
from service.jobs import repository as repo


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
