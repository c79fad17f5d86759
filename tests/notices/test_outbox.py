"""The notices outbox and its poller on the real databases: every notice applied once, in the listeners' terms;
a notice whose transaction commits after a later one's (PostgreSQL hands ids out at insert) is still applied;
pruned ids are never handed out again (a replica's floor would skip them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.migrate import upgrade
from service.db.session import make_engine, make_session_factory, unit_of_work
from service.jobs.queue import Listeners
from service.notices import outbox
from tests.conftest import _pg_fresh_schema_url


class Heard:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.listeners = Listeners(
            lambda owner, version: self.calls.append(("adapter", (owner, version))),
            lambda hashes: self.calls.append(("revoked", sorted(hashes))),
            lambda key: self.calls.append(("erased", key)),
        )


def _factory(url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    yield from _factory(db_url)


@pytest.fixture
def pg_factory() -> Iterator[sessionmaker[Session]]:
    for url in _pg_fresh_schema_url():
        upgrade(url)
        yield from _factory(url)


def test_each_notice_is_applied_once_in_the_listeners_terms(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        outbox.record_adapter(session, "before", 1)  # before the replica started: nothing to apply
    heard = Heard()
    poller = outbox.NoticePoller(factory, heard.listeners, keep_s=3600)
    with unit_of_work(factory) as session:
        outbox.record_revoked(session, "owner1", ["bb", "aa"])
        outbox.record_erased(session, "owner1")
        outbox.record_adapter(session, "owner1", None)
        outbox.record_adapter(session, "owner2", 7)
        outbox.record_revoked(session, "owner3", [])  # nothing revoked: no notice
    assert poller.poll_once() == 4
    assert heard.calls == [
        ("revoked", ["aa", "bb"]),
        ("erased", "owner1"),
        ("adapter", ("owner1", None)),
        ("adapter", ("owner2", 7)),
    ]
    assert poller.poll_once() == 0 and len(heard.calls) == 4


def test_the_fast_path_and_the_poll_never_both_apply_one_notice(factory: sessionmaker[Session]) -> None:
    heard = Heard()
    poller = outbox.NoticePoller(factory, heard.listeners, keep_s=3600)
    with unit_of_work(factory) as session:
        outbox.record_revoked(session, "o", ["k1", "k2"])
        outbox.record_adapter(session, "o", 3)
    poller.fast_path.revoked(["k1"])  # this replica's own commit (or pub/sub) applied part of it at once
    poller.fast_path.adapter("o", 3)
    assert poller.poll_once() == 1
    assert heard.calls == [("revoked", ["k1"]), ("adapter", ("o", 3)), ("revoked", ["k2"])]


def test_pruned_ids_are_never_reused(factory: sessionmaker[Session]) -> None:
    heard = Heard()
    poller = outbox.NoticePoller(factory, heard.listeners, keep_s=0)
    with unit_of_work(factory) as session:
        outbox.record_erased(session, "a")
    assert poller.poll_once() == 1
    assert poller.prune() == 1  # older than keep_s=0
    with unit_of_work(factory) as session:
        outbox.record_erased(session, "b")  # would take the pruned id 1 again without AUTOINCREMENT
    assert poller.poll_once() == 1 and heard.calls[-1] == ("erased", "b")


def test_a_notice_committed_after_a_later_one_is_still_applied(pg_factory: sessionmaker[Session]) -> None:
    """PostgreSQL: transaction 1 takes id 1, transaction 2 takes id 2 and commits first; the poll that sees id 2
    must not make the replica skip id 1 when it commits."""
    heard = Heard()
    poller = outbox.NoticePoller(pg_factory, heard.listeners, keep_s=3600)
    slow = pg_factory()
    outbox.record_erased(slow, "slow")  # id 1, not committed yet
    with unit_of_work(pg_factory) as session:
        outbox.record_erased(session, "fast")  # id 2, committed
    assert poller.poll_once() == 1 and heard.calls == [("erased", "fast")]
    slow.commit()
    slow.close()
    assert poller.poll_once() == 1 and heard.calls[-1] == ("erased", "slow")
    assert poller.poll_once() == 0


def test_a_later_notice_with_the_same_content_is_applied_when_only_the_outbox_carries_it(
    factory: sessionmaker[Session],
) -> None:
    # An adapter delete's "u 0" heard on the fast path, then (Redis down) that user's erase with its own "u 0":
    # deduped by content, the erase's adapter notice was skipped and the replica kept the user's adapters.
    calls: list[tuple[str, object]] = []
    listeners = Listeners(
        lambda owner, version: calls.append(("adapter", (owner, version))),
        lambda hashes: calls.append(("revoked", hashes)),
        lambda key: calls.append(("erased", key)),
    )
    poller = outbox.NoticePoller(factory, listeners, keep_s=3600)
    with unit_of_work(factory) as session:
        outbox.record_adapter(session, "u", None)
    poller.fast_path.adapter("u", None)
    poller.poll_once()
    assert calls == [("adapter", ("u", None))]  # once: the poll did not apply it again
    with unit_of_work(factory) as session:
        outbox.record_erased(session, "u")
        outbox.record_adapter(session, "u", None)
    calls.clear()
    poller.poll_once()
    assert ("erased", "u") in calls and ("adapter", ("u", None)) in calls
