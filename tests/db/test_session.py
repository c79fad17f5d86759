"""Engine settings: SQL errors never carry bound parameters (user data) into logs or jobs.error; SQLite's
synchronous level is a setting (FULL by default)."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from service.db.session import make_engine
from service.errors import safe_error_text

CANARY = "secret-canary-9f2"


def test_sql_errors_never_carry_user_data(db_url: str) -> None:
    """Bound parameters are hidden by the engine; what the database itself quotes (PostgreSQL's "Failing row
    contains ...") is withheld from the text that logs and jobs.error get."""
    engine = make_engine(db_url)
    try:
        insert = text("INSERT INTO users (id, user_id, storage_key) VALUES (1, :a, 'k1'), (2, :a, 'k2')")
        with engine.begin() as conn, pytest.raises(IntegrityError) as info:
            conn.execute(insert, {"a": CANARY})
        assert "parameters hidden" in str(info.value)
        assert CANARY not in safe_error_text(info.value) and "IntegrityError" in safe_error_text(info.value)
    finally:
        engine.dispose()


@pytest.mark.parametrize("level", ["FULL", "NORMAL"])
def test_sqlite_synchronous_is_a_setting(tmp_path: object, level: str) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/s.sqlite3", sqlite_synchronous=level)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == {"FULL": 2, "NORMAL": 1}[level]
    finally:
        engine.dispose()
    with pytest.raises(ValueError):
        make_engine("sqlite:///x.sqlite3", sqlite_synchronous="OFF")
