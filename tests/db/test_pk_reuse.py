"""No pk is ever reused (issue 23 N3): a user's pk can outlive the user in a running job, a history item's id is
a training cutoff, an adapter's id names contributors. SQLite's plain rowid hands the largest erased pk to the
next row; AUTOINCREMENT (migration 0005) never does, also on a database migrated from before it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import select

from service.adapters import repository as adapter_repo
from service.db.migrate import upgrade
from service.db.models import HistoryItem
from service.db.session import make_engine, make_session_factory, unit_of_work
from service.history import service as history
from service.history.schemas import HistoryAppendIn
from service.tenancy import UserRef
from service.users import create_user, delete_user_rows


def _user_with_history(url: str, user_id: str) -> tuple[UserRef, list[int]]:
    engine = make_engine(url)
    factory = make_session_factory(engine)
    try:
        with unit_of_work(factory) as session:
            user, _ = create_user(session, user_id)
        body = HistoryAppendIn.model_validate({"items": [{"id": f"i{n}", "output": f"o{n}"} for n in range(3)]})
        with unit_of_work(factory) as session:
            history.append(session, user, body)
        with unit_of_work(factory) as session:
            ids = list(session.scalars(select(HistoryItem.id).where(HistoryItem.user_pk == user.pk)))
        return user, ids
    finally:
        engine.dispose()


def _erase(url: str, user: UserRef) -> None:
    engine = make_engine(url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            delete_user_rows(session, user)
            adapter_repo.flag_trained_on(session, user.storage_key)
    finally:
        engine.dispose()


def test_create_erase_create_never_reuses_a_pk(db_url: str) -> None:
    first, first_items = _user_with_history(db_url, "ada")
    _erase(db_url, first)  # the newest user and the newest items are gone
    second, second_items = _user_with_history(db_url, "ada")
    assert second.pk > first.pk
    assert min(second_items) > max(first_items)
    assert second.storage_key != first.storage_key


def test_a_database_migrated_from_before_autoincrement_never_reuses_a_pk(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    url = f"sqlite:///{path}"
    upgrade(url, "0004")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO users (id, user_id, storage_key, created_at, history_items, history_bytes) "
            "VALUES (1, 'a', 'k1', '2026-01-01', 1, 1), (2, 'b', 'k2', '2026-01-01', 1, 1)"
        )
        conn.execute("INSERT INTO history_items (user_pk, client_id, output, created_at) VALUES (2, 'c', 'o', 'x')")
    upgrade(url)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM history_items").fetchone() == (1,)  # children kept by the rebuild
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("DELETE FROM users WHERE id = 2")
        conn.execute("INSERT INTO users (user_id, storage_key, created_at) VALUES ('c', 'k3', '2026-01-02')")
        assert conn.execute("SELECT id FROM users WHERE user_id = 'c'").fetchone() == (3,)
        assert conn.execute("SELECT COUNT(*) FROM history_items").fetchone() == (0,)
