"""service/users.py on PostgreSQL's read committed: two rotations of one user's key at once end with one live key."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service import users
from service.db.models import ApiKey
from service.db.session import make_engine, make_session_factory, unit_of_work
from service.sealing.session import session_info
from tests.factories import make_sealer


@pytest.fixture
def factory(db_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_session_factory(engine, session_info(make_sealer(tmp_path / "keyring")))
    engine.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite runs one writer at a time anyway
def test_two_admin_rotations_at_once_leave_exactly_one_live_key(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        user, _ = users.create_user(session, "rita")
    second_done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with unit_of_work(factory) as session:
                users.rotate_key(session, user, by_admin=True)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        second_done.set()

    with unit_of_work(factory) as session:
        users.rotate_key(session, user, by_admin=True)  # not committed yet when the second one starts
        thread = threading.Thread(target=second)
        thread.start()
        assert not second_done.wait(0.5)  # it waits for this rotation (before the fix it went on: 2 live keys)
    thread.join(30)
    assert not errors and second_done.is_set()
    with unit_of_work(factory) as session:
        live = select(func.count()).select_from(ApiKey).where(ApiKey.user_pk == user.pk, ApiKey.revoked_at.is_(None))
        assert session.scalar(live) == 1
