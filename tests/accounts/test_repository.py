"""service/accounts/repository.py and service/users.py on SQLite and PostgreSQL: a user's creation is one unit of
work with its first key (nothing of it survives a failure after the insert); an owner's key rotation with a
recovery code is a compare-and-set, so concurrent rotations with one code let exactly one through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service import users
from service.accounts import repository as repo
from service.db.models import ApiKey
from service.db.session import make_engine, make_session_factory, unit_of_work
from service.errors import Conflict
from service.sealing.session import session_info
from service.tenancy import hash_key
from tests.factories import make_sealer


@pytest.fixture
def factory(db_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_session_factory(engine, session_info(make_sealer(tmp_path / "keyring")))
    engine.dispose()


class KeyStoreDown(Exception):
    """The first key's insert fails (a database error after the user's row went in)."""


def test_a_failure_after_the_user_insert_leaves_no_user(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite: the SAVEPOINT around the insert was the transaction's first statement (pysqlite begins only before
    # DML), so releasing it committed the user row at once: a user without a key, and a retry got 409 forever.
    def failing_add_key(*_args: object) -> None:
        raise KeyStoreDown

    with monkeypatch.context() as patch:
        patch.setattr(repo, "add_key", failing_add_key)
        with pytest.raises(KeyStoreDown), unit_of_work(factory) as session:
            users.create_user(session, "tess")
    with unit_of_work(factory) as session:
        assert repo.by_user_id(session, "tess") is None
    with unit_of_work(factory) as session:  # the retry creates the user, with a key
        user, key = users.create_user(session, "tess")
    with unit_of_work(factory) as session:
        assert repo.user_by_key_hash(session, hash_key(key)) is not None
        assert [k.user_pk for k in repo.keys_of(session, user.pk)] == [user.pk]


def test_creating_a_taken_id_is_a_conflict_and_changes_nothing(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        user, _ = users.create_user(session, "tess")
    with pytest.raises(Conflict), unit_of_work(factory) as session:
        users.create_user(session, "tess")
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.user_pk == user.pk)) == 1


def test_a_concurrent_create_of_the_same_id_is_a_conflict(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both requests find no user; the second insert meets the first one's row: 409, not a 500.
    real_by_user_id = repo.by_user_id
    raced: list[str] = []

    def racing_by_user_id(session: Session, user_id: str) -> object:
        found = real_by_user_id(session, user_id)
        if not raced:
            raced.append(user_id)
            with unit_of_work(factory) as other:
                users.create_user(other, user_id)  # the other request commits between our check and our insert
        return found

    monkeypatch.setattr(repo, "by_user_id", racing_by_user_id)
    with pytest.raises(Conflict), unit_of_work(factory) as session:
        users.create_user(session, "tess")
    monkeypatch.undo()
    with unit_of_work(factory) as session:
        user = repo.by_user_id(session, "tess")
        assert user is not None and len(repo.keys_of(session, user.id)) == 1
