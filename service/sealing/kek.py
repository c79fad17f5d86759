"""Key-encryption keys (KEKs): what wraps every user's data key. `KeyEncryptionKeys` is the whole interface the
rest of the service sees, so a KMS (HashiCorp Vault transit, a cloud KMS) can replace the local keyset without
touching callers.

`LocalKeyset`: the KEKs from `OPPU_MASTER_KEY_FILE` (a JSON keyset, mode 0600: ``{"primary": ID, "keys": {ID:
base64}}``; a file holding one base64 key is accepted too) or `OPPU_MASTER_KEY` (one base64 key). A KEK's id is
derived from the key itself, so a wrong key can never pass for the right one. The file is re-read when it
changes (a rotation adds a primary while servers run: they unwrap with either, and wrap new keys under the new
primary). Knows nothing of users or SQL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.sealing.cipher import KEY_BYTES, NONCE, new_key


class MasterKeyError(Exception):
    """The master key (KEK) is missing, malformed or not the one the keyring was wrapped with."""


class KeyEncryptionKeys(Protocol):
    def primary_id(self) -> str:
        """The KEK new data keys are wrapped under."""
        ...

    def ids(self) -> set[str]:
        """Every KEK that can unwrap."""
        ...

    def wrap(self, data_key: bytes, ad: bytes) -> tuple[str, bytes]:
        """(kek id, wrapped key) under the primary KEK."""
        ...

    def unwrap(self, kek_id: str, wrapped: bytes, ad: bytes) -> bytes:
        """The data key; MasterKeyError if `kek_id` is unknown or the wrapped key does not open."""
        ...


def kek_id(key: bytes) -> str:
    """A KEK's public name: a hash of the key (never the key), so two different keys never share an id."""
    return "k" + hashlib.sha256(b"oppu-kek-id|" + key).hexdigest()[:16]


def _decode_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MasterKeyError("a master key must be base64 of 32 random bytes") from exc
    if len(key) != KEY_BYTES:
        raise MasterKeyError(f"a master key must be {KEY_BYTES} bytes (base64), got {len(key)}")
    return key


@dataclass(frozen=True)
class Keyset:
    primary: str
    keys: dict[str, bytes]

    @classmethod
    def single(cls, key: bytes) -> Keyset:
        return cls(kek_id(key), {kek_id(key): key})

    @classmethod
    def parse(cls, text: str) -> Keyset:
        stripped = text.strip()
        if not stripped.startswith("{"):
            return cls.single(_decode_key(stripped))
        try:
            raw = json.loads(stripped)
            keys = {kek_id(k): k for k in (_decode_key(v) for v in raw["keys"].values())}
            primary = str(raw["primary"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MasterKeyError(f"the master key file is not a keyset: {exc}") from exc
        if primary not in keys:
            raise MasterKeyError(f"the master key file's primary {primary} is not one of its keys (or its key changed)")
        return cls(primary, keys)

    def dump(self) -> str:
        keys = {i: base64.b64encode(k).decode("ascii") for i, k in self.keys.items()}
        return json.dumps({"primary": self.primary, "keys": keys}, indent=1) + "\n"

    def with_new_primary(self) -> Keyset:
        key = new_key()
        return Keyset(kek_id(key), {**self.keys, kek_id(key): key})

    def without(self, retired: set[str]) -> Keyset:
        if self.primary in retired:
            raise MasterKeyError("the primary master key cannot be retired")
        return Keyset(self.primary, {i: k for i, k in self.keys.items() if i not in retired})


def write_keyset(path: Path, keyset: Keyset, *, exclusive: bool = False) -> None:
    """Owner-only (0600), written whole then renamed into place: a reader never sees half a keyset."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if exclusive and path.exists():
        raise MasterKeyError(f"{path} exists already: never overwritten")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(keyset.dump())
        fh.flush()
        os.fsync(fh.fileno())
    if exclusive:
        os.link(tmp, path)  # fails if another process created it meanwhile
        os.unlink(tmp)
    else:
        os.replace(tmp, path)


class LocalKeyset:
    """KEKs held by this process: from a file (re-read when it changes) or from one key given inline."""

    def __init__(self, *, path: Path | None = None, inline: bytes | None = None) -> None:
        if (path is None) == (inline is None):
            raise ValueError("give the master key file or the key, not both")
        self._path, self._lock = path, threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keyset = Keyset.single(inline) if inline is not None else self._read()

    @property
    def path(self) -> Path | None:
        return self._path

    def _read(self) -> Keyset:
        assert self._path is not None
        try:
            stat = self._path.stat()
            keyset = Keyset.parse(self._path.read_text())
        except FileNotFoundError as exc:
            raise MasterKeyError(f"the master key file {self._path} does not exist") from exc
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return keyset

    def _fresh(self) -> Keyset:
        """The keyset, re-read if its file changed since (a rotation on another process)."""
        if self._path is None:
            return self._keyset
        with self._lock:
            try:
                stat = self._path.stat()
                if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                    self._keyset = self._read()
            except (OSError, MasterKeyError):
                pass  # keep the keys we have: a file mid-replacement or gone must not stop serving
            return self._keyset

    def keyset(self) -> Keyset:
        return self._fresh()

    def primary_id(self) -> str:
        return self._fresh().primary

    def ids(self) -> set[str]:
        return set(self._fresh().keys)

    def wrap(self, data_key: bytes, ad: bytes) -> tuple[str, bytes]:
        keyset = self._fresh()
        nonce = os.urandom(NONCE)
        return keyset.primary, nonce + AESGCM(keyset.keys[keyset.primary]).encrypt(nonce, data_key, ad)

    def unwrap(self, kek_id: str, wrapped: bytes, ad: bytes) -> bytes:
        key = self._fresh().keys.get(kek_id)
        if key is None:
            raise MasterKeyError(f"no master key {kek_id} here (the keyring was wrapped under another key)")
        try:
            return AESGCM(key).decrypt(wrapped[:NONCE], wrapped[NONCE:], ad)
        except InvalidTag as exc:
            raise MasterKeyError(f"a data key does not open under master key {kek_id}") from exc
