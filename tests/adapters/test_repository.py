"""adapters/repository and the version service's locking, on SQLite (where FOR UPDATE takes no lock) and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.adapters import repository as repo
from service.adapters import service
from service.db.migrate import upgrade
from service.db.models import Adapter
from service.db.session import make_engine, make_session_factory
from service.errors import NotFound
from tests.conftest import _pg_fresh_schema_url

OWNER = "abcd1234"


def test_a_version_allocation_that_lost_its_compare_and_set_rereads_the_counter(tmp_path: Path) -> None:
    # Two publishes of one owner at once: B reads last_version=1, waits for A's write lock, then loses the CAS.
    # Its retry must see A's committed counter; a row served from the session's identity map spun forever
    # while holding SQLite's write lock (every other writer then failed after its busy timeout).
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with factory() as s:
        assert repo.allocate_version(s, OWNER, None) == 1
        s.commit()
    a = factory()
    assert repo.allocate_version(a, OWNER, None) == 2  # publish A holds the write lock until its commit
    got: dict[str, int] = {}

    def publish_b() -> None:
        with factory() as b:
            got["b"] = repo.allocate_version(b, OWNER, None)
            b.commit()

    thread = threading.Thread(target=publish_b, daemon=True)
    thread.start()
    time.sleep(0.5)
    a.commit()
    a.close()
    thread.join(10)
    assert not thread.is_alive(), "publish B is still spinning on a stale counter"
    assert got["b"] == 3
    engine.dispose()


def _version(version: int) -> Adapter:
    return Adapter(
        owner_key=OWNER, user_pk=None, version=version, sha256="0" * 64, rank=4, alpha=8.0,
        target_modules=["q_proj"], base_model="tiny", base_fingerprint="f" * 64, nbytes=1, source="imported",
    )  # fmt: skip


@pytest.fixture
def pg_factory() -> Iterator[sessionmaker[Session]]:
    for url in _pg_fresh_schema_url():
        upgrade(url)
        engine = make_engine(url)
        yield make_session_factory(engine)
        engine.dispose()


def _while_first_holds(factory: sessionmaker[Session], first: Session, second: Callable[[Session], object]) -> object:
    """`second` in its own session and thread, started while `first` holds its locks, which commits 1 s later:
    what `second` returned (committed), or the exception it raised."""
    out: list[object] = []

    def run() -> None:
        with factory() as s:
            try:
                out.append(second(s))
                s.commit()
            except Exception as exc:
                out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    first.commit()
    first.close()
    thread.join(30)
    return out[0]


def test_a_rollback_racing_a_delete_never_points_current_at_a_gone_version(pg_factory: sessionmaker[Session]) -> None:
    # The rollback read its target before it locked the head: a delete committing in between left current
    # naming a version with no row (the user served the base model, GET /adapter 404, the rollback 200).
    with pg_factory() as s:
        for v in (1, 2):
            assert repo.allocate_version(s, OWNER, None) == v
            repo.add(s, _version(v))
        repo.set_current(s, OWNER, 2)
        s.commit()
    deleter = pg_factory()
    service.delete(deleter, None, OWNER)  # type: ignore[arg-type]  # rows gone, head locked, not committed
    # the rollback reads v1, then waits for the head's lock
    assert isinstance(_while_first_holds(pg_factory, deleter, lambda s: service.rollback(s, OWNER, 1)), NotFound)
    with pg_factory() as s:
        head = repo.head(s, OWNER)
        assert head is not None and head.current_version is None


def test_an_owners_first_two_publishes_at_once_both_get_a_version(pg_factory: sessionmaker[Session]) -> None:
    # Neither saw a head row, both inserted one: the second's IntegrityError was taken for "the user is gone"
    # (the upload answered 404).
    first = pg_factory()
    assert repo.allocate_version(first, OWNER, None) == 1  # its head insert is not committed yet
    assert _while_first_holds(pg_factory, first, lambda s: repo.allocate_version(s, OWNER, None)) == 2


def test_a_delete_racing_a_publish_never_leaves_a_version_that_is_not_current(
    pg_factory: sessionmaker[Session],
) -> None:
    # A publish of v2 holds the head's lock, uncommitted; the delete deleted the rows it saw (v1 only), waited
    # for the head only to clear `current`, and cleared it after v2 committed: v2 stayed without being current
    # (its upload had answered 201 current:true; GET /adapter then 404, and nothing would ever serve it).
    with pg_factory() as s:
        assert repo.allocate_version(s, OWNER, None) == 1
        repo.add(s, _version(1))
        repo.set_current(s, OWNER, 1)
        s.commit()
    publisher = pg_factory()
    assert repo.allocate_version(publisher, OWNER, None) == 2  # the head locked until the publish commits
    repo.add(publisher, _version(2))
    repo.set_current(publisher, OWNER, 2)
    deleted = _while_first_holds(pg_factory, publisher, lambda s: repo.delete_all(s, OWNER))
    assert deleted == [1, 2]  # the delete came after the publish: both versions (and their files) go
    with pg_factory() as s:
        head = repo.head(s, OWNER)
        assert head is not None and head.current_version is None and head.last_version == 2
        assert repo.list_versions(s, OWNER) == []


def test_a_rolled_back_first_publish_leaves_no_head(db_url: str) -> None:
    # SQLite: the head's insert sat in a SAVEPOINT that was the transaction's first statement (pysqlite begins
    # only before DML), so releasing it committed the head at once: a failed first upload left an empty head.
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as s:
        assert repo.allocate_version(s, OWNER, None) == 1
        s.rollback()
    with factory() as s:
        assert repo.head(s, OWNER) is None
        assert repo.allocate_version(s, OWNER, None) == 1
        s.commit()
    with factory() as s:
        head = repo.head(s, OWNER)
        assert head is not None and head.last_version == 1
    engine.dispose()
