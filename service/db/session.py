"""Engine + session factory. SQLite gets WAL, a busy timeout, enforced foreign keys and secure_delete (deleted
content is overwritten, not left in free pages); after an erase, a checkpoint moves the WAL into the database
file and truncates it, so no erased text stays on disk in either file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


SQLITE_SYNCHRONOUS = ("FULL", "NORMAL")
SQLITE_BUSY_TIMEOUT_S = 30.0  # a writer (or a checkpoint) waits this long for the lock before "database is locked"


def make_engine(url: str, *, sqlite_synchronous: str = "FULL") -> Engine:
    """Error messages never carry bound parameters (user data): hide_parameters. SQLite: WAL, a busy timeout,
    enforced foreign keys, and synchronous=FULL unless NORMAL is chosen (faster, but a power loss may drop
    the last acknowledged commits)."""
    if sqlite_synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"sqlite_synchronous must be one of {SQLITE_SYNCHRONOUS}")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            # Owner-only: the folder and the file (SQLite gives its -wal and -shm files the file's mode).
            Path(parsed.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(parsed.database, os.O_CREAT | os.O_RDWR, 0o600))
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
            hide_parameters=True,
            **_pool_arguments(url),
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cur.execute("PRAGMA secure_delete=ON")  # an erase zeroes the rows' bytes (pages and WAL frames)
            cur.close()

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg"))
    return create_engine(url, pool_pre_ping=True, hide_parameters=True, **_pool_arguments(url))


# A process's database connections (the pool, and what it opens beyond it under load): Settings checks the
# per-user preparation cap against it, so one user's requests cannot hold most of them.
POOL_SIZES = {"sqlite": (5, 10), "postgresql": (10, 20)}


def pool_capacity(url: str) -> int:
    """The most connections a process opens to the database at `url` (pool + overflow)."""
    return sum(_pool_sizes(url))


def _pool_sizes(url: str) -> tuple[int, int]:
    return POOL_SIZES.get(make_url(url).get_backend_name(), POOL_SIZES["postgresql"])


def _pool_arguments(url: str) -> dict[str, int]:
    if make_url(url).get_backend_name() == "sqlite" and make_url(url).database in (None, "", ":memory:"):
        return {}  # one connection per thread (SingletonThreadPool): no pool sizes to set
    size, overflow = _pool_sizes(url)
    return {"pool_size": size, "max_overflow": overflow}


def make_session_factory(engine: Engine, info: dict[str, Any] | None = None) -> sessionmaker[Session]:
    """`info` rides on every session (the composition root puts the sealer there: service.sealing.session)."""
    return sessionmaker(engine, expire_on_commit=False, info=info)


@dataclass(frozen=True)
class Database:
    """One database: its SQLAlchemy engine (the pool) and the session factory on it."""

    engine: Engine
    session_factory: sessionmaker[Session]

    @classmethod
    def open(cls, url: str, *, sqlite_synchronous: str = "FULL", info: dict[str, Any] | None = None) -> Database:
        engine = make_engine(url, sqlite_synchronous=sqlite_synchronous)
        return cls(engine, make_session_factory(engine, info))

    def ping(self) -> bool:
        """Readiness: can a connection run a query now?"""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def checkpoint(self) -> bool:
        """SQLite: copy the WAL into the database file and truncate it (after an erase, the old frames still
        hold the erased rows). True when the WAL is empty now; other backends: nothing to do."""
        return checkpoint_wal(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


def checkpoint_wal(engine: Engine) -> bool:
    """SQLite: the WAL copied into the database file and truncated (deleted rows' old frames gone; secure_delete
    has zeroed their pages). True when the WAL is empty now; other backends: nothing to do."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as conn:
        busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    if busy:
        log.warning("WAL checkpoint after a delete was blocked by a reader; the next checkpoint completes it")
    return not busy


AFTER_COMMIT = "oppu_after_commit"
AFTER_ROLLBACK = "oppu_after_rollback"


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` only once the unit of work has committed (file deletes, cache drops, enqueues)."""
    session.info.setdefault(AFTER_COMMIT, []).append(action)


def after_rollback(session: Session, action: Callable[[], None]) -> None:
    """Run `action` if the unit of work rolls back (undo a file written for rows that never came to be)."""
    session.info.setdefault(AFTER_ROLLBACK, []).append(action)


def _run(session: Session, key: str, what: str) -> None:
    actions: list[Callable[[], None]] = session.info.pop(key, [])
    for action in actions:
        try:
            action()
        except Exception:  # the outcome stands; a failed side effect is logged, not raised
            log.exception("%s action failed", what)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One commit per request or job: commit at the end, roll back on any error."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            session.info.pop(AFTER_COMMIT, None)
            _run(session, AFTER_ROLLBACK, "after-rollback")
            raise
        session.info.pop(AFTER_ROLLBACK, None)
        _run(session, AFTER_COMMIT, "after-commit")
