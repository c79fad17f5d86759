"""Master keys: ids derived from the key, keyset files (0600, never overwritten by a first start), re-read
when a rotation changes them, and a wrong key never passing for the right one."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from service.sealing.kek import Keyset, LocalKeyset, MasterKeyError, kek_id, write_keyset


def test_a_key_file_may_hold_one_base64_key_or_a_keyset(tmp_path: Path) -> None:
    key = os.urandom(32)
    (tmp_path / "one").write_text(base64.b64encode(key).decode() + "\n")
    assert LocalKeyset(path=tmp_path / "one").primary_id() == kek_id(key)
    with pytest.raises(MasterKeyError):
        Keyset.parse(base64.b64encode(os.urandom(16)).decode())  # too short
    with pytest.raises(MasterKeyError):
        Keyset.parse('{"primary": "k0", "keys": {}}')
    with pytest.raises(MasterKeyError):
        LocalKeyset(path=tmp_path / "missing")


def test_wrapped_keys_open_only_under_their_kek_and_binding(tmp_path: Path) -> None:
    keks = LocalKeyset(inline=os.urandom(32))
    kek, wrapped = keks.wrap(b"d" * 32, b"alice")
    assert keks.unwrap(kek, wrapped, b"alice") == b"d" * 32
    with pytest.raises(MasterKeyError):
        keks.unwrap(kek, wrapped, b"bob")
    other = LocalKeyset(inline=os.urandom(32))
    with pytest.raises(MasterKeyError, match="no master key"):
        other.unwrap(kek, wrapped, b"alice")  # a wrong key has another id: refused before any decryption


def test_a_rotation_is_seen_by_a_running_process_and_old_keys_still_unwrap(tmp_path: Path) -> None:
    path = tmp_path / "master_key"
    write_keyset(path, Keyset.single(os.urandom(32)), exclusive=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(MasterKeyError):
        write_keyset(path, Keyset.single(os.urandom(32)), exclusive=True)  # never overwritten
    running = LocalKeyset(path=path)
    old_id, wrapped = running.wrap(b"k" * 32, b"ad")
    rotated = running.keyset().with_new_primary()
    write_keyset(path, rotated)
    assert running.primary_id() == rotated.primary != old_id  # re-read on change
    assert running.unwrap(old_id, wrapped, b"ad") == b"k" * 32
    assert running.wrap(b"k" * 32, b"ad")[0] == rotated.primary
    write_keyset(path, rotated.without({old_id}))
    with pytest.raises(MasterKeyError):
        running.unwrap(old_id, wrapped, b"ad")
    with pytest.raises(MasterKeyError):
        rotated.without({rotated.primary})
