"""The sealer: one data key per owner made once (also under concurrent first use), shredding that leaves a
tombstone, per-user key versions, the start-up master-key check and the re-wrap of a master-key rotation."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from service.db.session import Database
from service.sealing.kek import Keyset, LocalKeyset, MasterKeyError, write_keyset
from service.sealing.models import KeyringBase
from service.sealing.service import SealedDataUnreadable, Sealer, UserDataErased


def keyring(tmp_path: Path) -> Database:
    db = Database.open(f"sqlite:///{tmp_path / 'keyring.sqlite3'}")
    KeyringBase.metadata.create_all(db.engine)
    return db


def test_an_owner_gets_one_key_even_when_many_threads_ask_first(tmp_path: Path) -> None:
    db, keks = keyring(tmp_path), LocalKeyset(inline=os.urandom(32))
    sealers = [Sealer(db.session_factory, keks) for _ in range(4)]  # four processes' caches
    tokens: list[str] = []
    threads = [
        threading.Thread(target=lambda s=s: tokens.append(s.user("alice").seal_text("p", "hi"))) for s in sealers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tokens) == 4
    assert all(sealers[0].user("alice").open_text("p", t) == "hi" for t in tokens)
    assert sealers[0].status()["data_keys_by_kek"] == {keks.primary_id(): 1}


def test_shredding_closes_every_copy_and_no_new_key_is_made(tmp_path: Path) -> None:
    db, keks = keyring(tmp_path), LocalKeyset(inline=os.urandom(32))
    sealer, other_replica = Sealer(db.session_factory, keks), Sealer(db.session_factory, keks)
    token = sealer.user("alice").seal_text("history", "zebracorn")
    bob = sealer.user("bob").seal_text("history", "bob's")
    assert other_replica.user("alice").open_text("history", token) == "zebracorn"  # cached there now
    sealer.shred("alice")
    with pytest.raises(UserDataErased):
        sealer.user("alice").open_text("history", token)
    with pytest.raises(UserDataErased):
        sealer.user("alice").seal_text("history", "new")  # a tombstone: never a new key
    other_replica.forget("alice")  # what the erase notice does on every replica
    with pytest.raises(UserDataErased):
        other_replica.user("alice").open_text("history", token)
    assert sealer.user("bob").open_text("history", bob) == "bob's"
    with pytest.raises(SealedDataUnreadable):  # alice's ciphertext moved to bob: never bob's plaintext
        sealer.user("bob").open_text("history", token)


def test_a_new_key_version_opens_old_values_until_the_old_version_is_dropped(tmp_path: Path) -> None:
    db = keyring(tmp_path)
    sealer = Sealer(db.session_factory, LocalKeyset(inline=os.urandom(32)))
    old = sealer.user("alice").seal_text("p", "v1")
    assert sealer.rotate_user("alice") == 2
    new = sealer.user("alice").seal_text("p", "v2")
    assert new.startswith("s1.2.") and old.startswith("s1.1.")
    assert sealer.user("alice").open_text("p", old) == "v1"
    sealer.drop_versions_below("alice", 2)
    assert sealer.user("alice").open_text("p", new) == "v2"
    with pytest.raises(SealedDataUnreadable):
        sealer.user("alice").open_text("p", old)


def test_the_start_check_refuses_a_wrong_or_missing_master_key(tmp_path: Path) -> None:
    db = keyring(tmp_path)
    right = LocalKeyset(inline=os.urandom(32))
    Sealer(db.session_factory, right).user("alice").seal_text("p", "x")
    Sealer(db.session_factory, right).check_keks()
    with pytest.raises(MasterKeyError, match="not configured"):
        Sealer(db.session_factory, LocalKeyset(inline=os.urandom(32))).check_keks()


def test_rewrap_moves_every_key_under_the_new_primary_and_values_still_open(tmp_path: Path) -> None:
    db, path = keyring(tmp_path), tmp_path / "master_key"
    write_keyset(path, Keyset.single(os.urandom(32)), exclusive=True)
    sealer = Sealer(db.session_factory, LocalKeyset(path=path))
    tokens = {f"u{i}": sealer.user(f"u{i}").seal_text("p", f"value {i}") for i in range(7)}
    rotated = LocalKeyset(path=path).keyset().with_new_primary()
    write_keyset(path, rotated)
    assert sealer.rewrap_batch(limit=3) == 3
    while sealer.rewrap_batch(limit=3):
        pass
    assert sealer.kek_counts() == {rotated.primary: 7}
    fresh = Sealer(db.session_factory, LocalKeyset(inline=rotated.keys[rotated.primary]))  # only the new key
    assert all(fresh.user(u).open_text("p", t) == f"value {u[1:]}" for u, t in tokens.items())


def test_close_closes_the_keyrings_connections(tmp_path: Path) -> None:
    """Shutdown (composition.stop): the keyring is its own pool, closed with the sealer, not left to the GC."""
    db = keyring(tmp_path)
    sealer = Sealer(db.session_factory, LocalKeyset(inline=os.urandom(32)))
    sealer.user("alice").seal_text("p", "hi")
    pool = db.engine.pool
    assert pool.checkedin() > 0  # type: ignore[attr-defined]
    sealer.close()
    assert pool.checkedin() == 0  # type: ignore[attr-defined]
