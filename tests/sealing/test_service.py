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


def test_another_owners_value_is_unreadable_not_erased_for_an_owner_with_no_key_yet(tmp_path: Path) -> None:
    # 410 user_data_erased was answered for an owner who never had a key (no tombstone) handed another owner's
    # ciphertext: the erase is claimed only with a tombstone; anything else is data that does not open (409).
    db, keks = keyring(tmp_path), LocalKeyset(inline=os.urandom(32))
    sealer = Sealer(db.session_factory, keks)
    token = sealer.user("alice").seal_text("history", "zebracorn")
    assert sealer.live_versions("carol") == []
    with pytest.raises(SealedDataUnreadable):
        sealer.user("carol").open_text("history", token)
    blob = sealer.user("alice").seal_bytes("weights", b"zebracorn")
    with pytest.raises(SealedDataUnreadable):
        sealer.user("carol").open_bytes("weights", blob)
    assert sealer.live_versions("carol") == []  # opening made no key
    sealer.shred("carol")
    with pytest.raises(UserDataErased):  # with the tombstone: erased
        sealer.user("carol").open_text("history", token)


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


def test_an_erase_between_a_first_writes_tombstone_check_and_its_insert_leaves_no_live_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.sealing import repository as keyring_repo

    db, keks = keyring(tmp_path), LocalKeyset(inline=os.urandom(32))
    writer, eraser = Sealer(db.session_factory, keks), Sealer(db.session_factory, keks)  # two processes
    real_insert = keyring_repo.insert_key

    def insert_after_the_erase(*args: object) -> bool:
        eraser.shred("alice")  # the erase commits in the gap between the check and the insert
        return real_insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(keyring_repo, "insert_key", insert_after_the_erase)
    with pytest.raises(UserDataErased):
        writer.user("alice").seal_text("history", "a first item")
    monkeypatch.setattr(keyring_repo, "insert_key", real_insert)
    assert writer.live_versions("alice") == []
    # and a key row that survived such a race anyway (the write's process died) is never used: tombstone wins
    with db.session_factory() as session:
        kek, wrapped = keks.wrap(os.urandom(32), b"oppu-data-key|alice|1")
        real_insert(session, "alice", 1, kek, wrapped)
        session.commit()
    with pytest.raises(UserDataErased):
        Sealer(db.session_factory, keks).user("alice").seal_text("history", "x")


def test_shredded_and_dropped_keys_leave_the_keyrings_wal(tmp_path: Path) -> None:
    # secure_delete zeroes the deleted pages, but until a checkpoint the WAL still held the old frames: with the
    # master key (by default in the same data dir) a copy of the directory opened the erased user's key.
    db, keks = keyring(tmp_path), LocalKeyset(inline=os.urandom(32))
    sealer = Sealer(db.session_factory, keks)
    sealer.user("alice").seal_text("history", "zebracorn")
    sealer.rotate_user("bob")
    sealer.rotate_user("bob")  # bob: versions 1 and 2
    with db.session_factory() as session:
        from service.sealing.models import DataKey

        wrapped = {(r.owner_key, r.version): bytes(r.wrapped) for r in session.query(DataKey).all()}
    sealer.shred("alice")
    sealer.drop_versions_below("bob", 2)
    files = [tmp_path / "keyring.sqlite3", tmp_path / "keyring.sqlite3-wal"]
    on_disk = b"".join(f.read_bytes() for f in files if f.exists())
    assert wrapped[("alice", 1)] not in on_disk
    assert wrapped[("bob", 1)] not in on_disk
    assert wrapped[("bob", 2)] in on_disk  # the live key is still there (the check can see keys at all)


def test_a_file_resealed_while_it_is_opened_opens_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A data-key rotation replaces a sealed file with one under the next version while a cold load opens it:
    # the version came from one open() and the decryption from a second one (the new file): 409 for intact data.
    from service.adapters.peft_format import WEIGHTS_NAME, file_purpose
    from tests.factories import make_sealer

    sealer = make_sealer(tmp_path / "keyring")
    seal = sealer.user("alice")
    purpose, path = file_purpose(WEIGHTS_NAME), tmp_path / WEIGHTS_NAME
    path.write_bytes(seal.seal_bytes(purpose, b"weights" * 1000))  # under v1
    sealer.rotate_user("alice")  # v2; v1 still live until the rotation drops it
    real_key = sealer.key

    def reseal_then_key(owner_key: str, version: int) -> bytes:
        monkeypatch.setattr(sealer, "key", real_key)
        fresh = tmp_path / "fresh"
        fresh.write_bytes(seal.seal_bytes(purpose, bytes(seal.open_bytes(purpose, path.read_bytes()))))  # v2
        fresh.replace(path)  # the rotation's os.replace lands while the load holds the version
        return real_key(owner_key, version)

    monkeypatch.setattr(sealer, "key", reseal_then_key)
    assert bytes(seal.open_path(purpose, path)) == b"weights" * 1000
    assert cipher_version(path) == 2  # the file was replaced meanwhile


def cipher_version(path: Path) -> int:
    from service.sealing import cipher

    return cipher.file_version(path.read_bytes()[: cipher.HEADER])
