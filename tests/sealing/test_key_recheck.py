"""THE rule for several processes (service/sealing/service.py): a process's cached data keys are re-checked
against the keyring, for choosing the key new values are sealed under, at most `recheck_s` after they were read;
a rotation's "keys" notice (outbox poll and pub/sub fast path) makes a replica forget them at once; keyed hashes
are matched under every live version. Two Sealer instances over one keyring are two processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import Database, unit_of_work
from service.jobs.queue import KEYS_CHANNEL, Listeners, _dispatch
from service.notices import outbox
from service.sealing.kek import LocalKeyset
from service.sealing.models import KeyringBase
from service.sealing.service import Sealer
from service.sealing.session import session_info


def _replicas(folder: Path, recheck_s: float) -> tuple[Sealer, Sealer]:
    keyring = Database.open(f"sqlite:///{folder / 'keyring.sqlite3'}")
    KeyringBase.metadata.create_all(keyring.engine)
    keks = LocalKeyset(inline=os.urandom(32))
    return Sealer(keyring.session_factory, keks, recheck_s=recheck_s), Sealer(
        keyring.session_factory, keks, recheck_s=recheck_s
    )


def test_a_replica_seals_under_the_new_version_within_the_recheck(tmp_path: Path) -> None:
    a, b = _replicas(tmp_path, recheck_s=0.2)
    assert b.user("ann").version() == 1  # b caches version 1
    assert a.rotate_user("ann") == 2
    assert b.user("ann").version() == 1  # within recheck_s b may still seal under 1 ...
    time.sleep(0.25)
    assert b.user("ann").version() == 2  # ... never after
    token = b.user("ann").seal_text("p", "x")
    a.drop_versions_below("ann", 2)
    assert a.user("ann").open_text("p", token) == "x"
    assert b.live_versions("ann") == [2]


def test_tags_match_under_every_live_version(tmp_path: Path) -> None:
    a, _ = _replicas(tmp_path, recheck_s=0.05)
    old = a.user("ann").tag("client-1")
    a.rotate_user("ann")
    tags = a.user("ann").tags(["client-1"])["client-1"]
    assert tags[0] == a.user("ann").tag("client-1") != old  # written under the current version
    assert tags[1:] == [old]  # still matched under the old one
    a.drop_versions_below("ann", 2)
    assert a.user("ann").tags(["client-1"])["client-1"] == [tags[0]]


def test_a_replica_that_has_not_heard_of_a_rotation_still_matches_the_new_versions_tags(tmp_path: Path) -> None:
    """A client retries an append on replica b after replica a stored it under the new version: b's lookup must
    match a's tag, even though b may still seal under the old version for up to recheck_s."""
    a, b = _replicas(tmp_path, recheck_s=3600.0)
    assert b.user("ann").version() == 1  # b caches version 1 and would keep it an hour
    a.rotate_user("ann")
    stored_by_a = a.user("ann").tag("client-1")
    assert stored_by_a in b.user("ann").tags(["client-1"])["client-1"]
    a.drop_versions_below("ann", 2)
    assert b.user("ann").tags(["client-1"])["client-1"] == [stored_by_a]  # the destroyed version is not asked


def test_recheck_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _replicas(tmp_path, recheck_s=0)


def test_a_keys_notice_makes_the_replica_forget_at_once(tmp_path: Path, db_url: str) -> None:
    a, b = _replicas(tmp_path, recheck_s=3600.0)  # without the notice b would seal under 1 for an hour
    db = Database.open(db_url, info=session_info(b))
    factory: sessionmaker[Session] = db.session_factory
    poller = outbox.NoticePoller(factory, Listeners(lambda *_: None, lambda _: None), keep_s=3600)
    assert b.user("ann").version() == 1
    a.rotate_user("ann")
    with unit_of_work(factory) as session:
        outbox.record_keys(session, "ann")
    assert poller.poll_once() == 1  # the poll (no listener given: the factory's sealer forgets)
    assert b.user("ann").version() == 2
    a.rotate_user("ann")
    _dispatch(poller.fast_path, KEYS_CHANNEL, "ann")  # the pub/sub fast path
    assert b.user("ann").version() == 3
    with unit_of_work(factory) as session:
        outbox.record_keys(session, "ann")  # the same owner again within the dedupe window: applied again
    assert poller.poll_once() == 1
    db.dispose()
