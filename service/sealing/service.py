"""Envelope encryption at rest: one random data key per user (by storage key), kept only wrapped by a KEK in a
keyring apart from the data (`Sealer`), and the per-user handle that seals and opens that user's values and
files (`UserSeal`). Erasing a user shreds their keys: every copy of their ciphertext, backups included, stays
closed for good.

The keyring is its own store, like a KMS: its writes commit at once (a key made for a transaction that then
rolls back is an unused key, never a lost one). Plaintext keys live only in this process's memory (an LRU).

THE rule for several processes (API replicas, workers) and a per-user key rotation: the key a process seals NEW
values under (`current`, and the keyed hashes of `tag`) comes from a cache entry re-checked against the keyring
at most `recheck_s` (OPPU_KEY_RECHECK_S) old, so `recheck_s` after a rotation made version v+1 no process seals
under v any more (a rotation's notice makes them forget sooner; `sealing/operations.rotate_user` waits it out
before it re-seals and destroys v). Opening needs no recheck: a version not in the cache is read on demand.
Idempotency lookups match a value's keyed hash under every live version, read from the keyring at each lookup
(`UserSeal.tags`).
Knows nothing of tables, routes or what the sealed values mean; callers name the purpose of each value, and
every ciphertext is bound to (owner, purpose): copied to another user's row or file, it does not open.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import checkpoint_wal
from service.errors import ServiceError
from service.sealing import cipher
from service.sealing import repository as repo
from service.sealing.cipher import SealBroken
from service.sealing.kek import KeyEncryptionKeys, MasterKeyError

CACHE_OWNERS = 4096  # opened data keys kept in memory (32 bytes each per version)
RECHECK_S = 5.0  # default of OPPU_KEY_RECHECK_S


class UserDataErased(ServiceError):
    """The user's data key was destroyed (an erase): what is left of their data, e.g. in a restored backup,
    cannot be opened."""

    status, code = 410, "user_data_erased"


class SealedDataUnreadable(ServiceError):
    """A stored value or file does not open under its owner's key: damaged, or copied from another owner."""

    status, code = 409, "sealed_data_unreadable"


def _wrap_ad(owner_key: str, version: int) -> bytes:
    return f"oppu-data-key|{owner_key}|{version}".encode()


def _ad(owner_key: str, purpose: str) -> bytes:
    return f"{owner_key}|{purpose}".encode()


def _tag(version: int, tag_key: bytes, value: str) -> str:
    return f"t{version}." + hmac.new(tag_key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def tag_version(stored: str) -> int | None:
    """The data-key version a keyed hash (`UserSeal.tag`: `t<version>.<hmac>`) was made under; None for anything
    else (e.g. a plaintext row's own client id)."""
    head, dot, _ = stored.partition(".")
    digits = head[1:]
    return int(digits) if dot and head[:1] == "t" and digits.isascii() and digits.isdigit() else None


def _tag_key(data_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"oppu-tag-v1").derive(data_key)


class Sealer:
    """Owns the data keys: made on first use, opened through the KEKs, cached, shredded on erase, re-wrapped
    on a master-key rotation. `enabled=False` (OPPU_SEAL_AT_REST=false) makes every handle a plaintext one."""

    def __init__(
        self,
        keyring: sessionmaker[Session] | None,
        keks: KeyEncryptionKeys | None,
        *,
        enabled: bool = True,
        recheck_s: float = RECHECK_S,
    ) -> None:
        if enabled and (keyring is None or keks is None):
            raise ValueError("sealing needs a keyring and a master key")
        if recheck_s <= 0:
            raise ValueError("recheck_s must be > 0")
        self.enabled = enabled
        self.recheck_s = recheck_s
        self._keyring_factory, self._kek_source = keyring, keks
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, dict[int, bytes]] = OrderedDict()
        self._checked_at: dict[str, float] = {}  # when each cached owner's versions were read from the keyring
        self._tag_keys: dict[tuple[str, int], bytes] = {}  # one HKDF per key version, not per tagged value

    def close(self) -> None:
        """Shutdown: the keyring's connections are closed (its database is its own pool)."""
        if self.keyring_engine is not None:
            self.keyring_engine.dispose()

    def user(self, owner_key: str) -> UserSeal:
        """The handle for one owner (cheap: keys are read when a value is sealed or opened)."""
        return UserSeal(self, owner_key)

    @property
    def _keks(self) -> KeyEncryptionKeys:
        if self._kek_source is None:
            raise SealedDataUnreadable("sealed data met, but no master key is configured (OPPU_MASTER_KEY_FILE)")
        return self._kek_source

    @contextmanager
    def _session(self) -> Iterator[Session]:
        if self._keyring_factory is None:
            raise SealedDataUnreadable("sealed data met, but no keyring is configured (OPPU_KEYRING_URL)")
        session = self._keyring_factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # --- keys ---

    def _load(self, owner_key: str, *, max_age_s: float | None = None) -> dict[int, bytes]:
        """The owner's opened keys by version: cached, or (none cached, or cached more than `max_age_s` ago)
        read from the keyring (versions already open are not unwrapped again)."""
        with self._lock:
            keys = self._cache.get(owner_key)
            if keys is not None:
                self._cache.move_to_end(owner_key)
                checked = self._checked_at.get(owner_key, 0.0)
                if max_age_s is None or time.monotonic() - checked <= max_age_s:
                    return keys
        known = keys or {}
        checked_at = time.monotonic()
        with self._session() as session:
            rows = repo.keys_of(session, owner_key)
            # The tombstone wins over key rows: a key made by a first write racing the erase is never used.
            if repo.is_shredded(session, owner_key):
                self.forget(owner_key)
                raise UserDataErased("this user's data was erased; what remains of it cannot be opened")
            try:
                keys = {
                    r.version: known.get(r.version)
                    or self._keks.unwrap(r.kek_id, r.wrapped, _wrap_ad(owner_key, r.version))
                    for r in rows
                }
            except MasterKeyError as exc:
                raise SealedDataUnreadable(f"a data key of this user cannot be opened: {exc}") from exc
        if keys:
            self._remember(owner_key, keys, checked_at)
        else:
            self.forget(owner_key)
        return keys

    def _remember(self, owner_key: str, keys: dict[int, bytes], checked_at: float) -> None:
        with self._lock:
            self._cache[owner_key] = keys
            self._checked_at[owner_key] = checked_at
            self._cache.move_to_end(owner_key)
            for k in [k for k in self._tag_keys if k[0] == owner_key and k[1] not in keys]:
                del self._tag_keys[k]  # a version destroyed by a rotation
            while len(self._cache) > CACHE_OWNERS:
                gone, _ = self._cache.popitem(last=False)
                self._checked_at.pop(gone, None)
                for k in [k for k in self._tag_keys if k[0] == gone]:
                    del self._tag_keys[k]

    def current(self, owner_key: str) -> tuple[int, bytes]:
        """The newest data key of the owner (what new values are sealed under), made now if they have none
        (never for a shredded owner). Re-checked against the keyring once the cached versions are older than
        `recheck_s`: a rotation by another process is seen within that."""
        keys = self._load(owner_key, max_age_s=self.recheck_s)
        if not keys:
            keys = self._create(owner_key, 1)
        version = max(keys)
        return version, keys[version]

    def key(self, owner_key: str, version: int) -> bytes:
        keys = self._load(owner_key)
        if version not in keys:  # a newer version made by another process (a per-user rotation)
            self.forget(owner_key)
            keys = self._load(owner_key)
        if version not in keys:
            # Erased only with a tombstone: an owner with no key yet handed another owner's value was never erased
            # (README: data copied from another user is 409).
            with self._session() as session:
                if repo.is_shredded(session, owner_key):
                    raise UserDataErased("this user's data was erased; what remains of it cannot be opened")
            if not keys:
                raise SealedDataUnreadable("this user has no data key: the value is not theirs (copied?)")
            raise SealedDataUnreadable(f"this user's data key version {version} is gone")
        return keys[version]

    def _create(self, owner_key: str, version: int) -> dict[int, bytes]:
        data_key = cipher.new_key()
        kek, wrapped = self._keks.wrap(data_key, _wrap_ad(owner_key, version))
        with self._session() as session:
            if repo.is_shredded(session, owner_key):
                raise UserDataErased("this user's data was erased")
            repo.insert_key(session, owner_key, version, kek, wrapped)  # False: another process made it first
        with self._session() as session:
            # An erase that shredded between the check above and the insert found no key to delete: ours goes
            # now (an erase committing later deletes it itself).
            if repo.is_shredded(session, owner_key):
                repo.shred(session, owner_key)
                erased = True
            else:
                erased = False
        if erased:
            self.forget(owner_key)
            self._checkpoint()
            raise UserDataErased("this user's data was erased")
        self.forget(owner_key)
        return self._load(owner_key)  # the keyring's keys: ours, or theirs if they won the race

    def rotate_user(self, owner_key: str) -> int:
        """A new data-key version for the owner (new values use it; old ones open until re-sealed)."""
        self.forget(owner_key)  # from the keyring itself: never a version number another process took already
        keys = self._load(owner_key) or self._create(owner_key, 1)
        return max(self._create(owner_key, max(keys) + 1))

    def live_versions(self, owner_key: str) -> list[int]:
        """The owner's data-key versions in the keyring now, oldest first (none: no key yet)."""
        with self._session() as session:
            return [row.version for row in repo.keys_of(session, owner_key)]

    def drop_versions_below(self, owner_key: str, version: int) -> None:
        with self._session() as session:
            repo.delete_versions_below(session, owner_key, version)
        self.forget(owner_key)
        self._checkpoint()

    def tag_key(self, owner_key: str) -> tuple[int, bytes]:
        """(version, the key of keyed hashes) of the owner's current data key."""
        version, key = self.current(owner_key)
        return version, self._tag_key_of(owner_key, version, key)

    def tag_keys(self, owner_key: str) -> list[tuple[int, bytes]]:
        """(version, tag key) of every live data-key version of the owner, the current one first: a value hashed
        before a rotation re-sealed its row is still matched. The versions are read from the keyring on every
        call, not within `recheck_s`: a replica that has not yet heard of a rotation must still find a row another
        replica hashed under the new version (a retried append would be stored twice). One small read per
        lookup; versions already open are not unwrapped again."""
        self.refresh(owner_key)
        version, _ = self.current(owner_key)
        with self._lock:
            keys = dict(self._cache.get(owner_key) or {})
        versions = sorted({version, *keys}, reverse=True)
        return [(v, self._tag_key_of(owner_key, v, keys[v] if v in keys else self.key(owner_key, v))) for v in versions]

    def refresh(self, owner_key: str) -> None:
        """Re-read the owner's key versions from the keyring now (one small read; open versions stay open)."""
        self._load(owner_key, max_age_s=0.0)

    def _tag_key_of(self, owner_key: str, version: int, key: bytes) -> bytes:
        with self._lock:
            tag = self._tag_keys.get((owner_key, version))
        if tag is None:
            tag = _tag_key(key)
            with self._lock:
                if owner_key in self._cache:  # not for an owner forgotten meanwhile
                    self._tag_keys[(owner_key, version)] = tag
        return tag

    def forget(self, owner_key: str) -> None:
        """Drop the owner's opened keys from memory (erase notices reach every replica through this)."""
        with self._lock:
            self._cache.pop(owner_key, None)
            self._checked_at.pop(owner_key, None)
            for k in [k for k in self._tag_keys if k[0] == owner_key]:
                del self._tag_keys[k]

    def shred(self, owner_key: str) -> None:
        """Crypto-shredding: the owner's wrapped keys leave the keyring (a tombstone stays)."""
        with self._session() as session:
            repo.shred(session, owner_key)
        self.forget(owner_key)
        self._checkpoint()

    @property
    def keyring_engine(self) -> Engine | None:
        """The keyring database's engine (None: no keyring configured)."""
        bind = self._keyring_factory.kw.get("bind") if self._keyring_factory is not None else None
        return bind if isinstance(bind, Engine) else None

    def _checkpoint(self) -> None:
        """A SQLite keyring's WAL still holds the frames of the keys just deleted (wrapped, but the master key
        often sits in the same data dir): they go to the zeroed main file now, not at SQLite's next checkpoint."""
        if self.keyring_engine is not None:
            checkpoint_wal(self.keyring_engine)

    def is_shredded(self, owner_key: str) -> bool:
        with self._session() as session:
            return repo.is_shredded(session, owner_key)

    # --- operator ---

    def check_keks(self) -> None:
        """Start-up: every KEK the keyring uses is here and opens its keys; MasterKeyError (refuse to start)
        otherwise. Nothing is written."""
        if self._keyring_factory is None:
            return
        with self._session() as session:
            used = repo.kek_counts(session)
            if self._kek_source is None and not used:
                return  # sealing off and nothing ever sealed: no master key needed
            missing = sorted(set(used) - self._keks.ids())
            if missing:
                raise MasterKeyError(
                    f"the keyring holds data keys wrapped under master key(s) {missing} that are not configured "
                    "(wrong OPPU_MASTER_KEY_FILE / OPPU_MASTER_KEY?); refusing to start"
                )
            for row in repo.one_per_kek(session):
                self._keks.unwrap(row.kek_id, row.wrapped, _wrap_ad(row.owner_key, row.version))

    def rewrap_batch(self, limit: int = 500) -> int:
        """Master-key rotation, one resumable step: re-wrap up to `limit` keys not under the primary KEK.
        Returns how many were re-wrapped (0: done)."""
        primary = self._keks.primary_id()
        done = 0
        with self._session() as session:
            for row in repo.not_under(session, primary, limit):
                ad = _wrap_ad(row.owner_key, row.version)
                data_key = self._keks.unwrap(row.kek_id, row.wrapped, ad)
                kek, wrapped = self._keks.wrap(data_key, ad)
                done += repo.rewrap(session, row, row.kek_id, kek, wrapped)
        return done

    def kek_counts(self) -> dict[str, int]:
        """Data keys per master-key id."""
        with self._session() as session:
            return repo.kek_counts(session)

    def status(self) -> dict[str, object]:
        with self._session() as session:
            return {
                "enabled": self.enabled,
                "primary_kek": self._keks.primary_id(),
                "keks_configured": sorted(self._keks.ids()),
                "data_keys_by_kek": repo.kek_counts(session),
                "users_with_keys": repo.owner_count(session),
                "users_shredded": repo.shredded_count(session),
            }


@dataclass(frozen=True)
class UserSeal:
    """One owner's values and files, sealed under their current data key and opened under the version they
    were sealed with. A plaintext handle (sealing off) returns None from seal_* so callers store plaintext."""

    sealer: Sealer
    owner_key: str

    @property
    def enabled(self) -> bool:
        return self.sealer.enabled

    def version(self) -> int:
        """The owner's current data-key version (made now if they have none)."""
        return self.sealer.current(self.owner_key)[0]

    def newest_version(self) -> int:
        """The owner's newest data-key version in the keyring NOW (not as cached within recheck_s): what a value
        sealed earlier must be under when it is committed after a rotation's settle time."""
        self.sealer.refresh(self.owner_key)
        return self.version()

    def seal_text(self, purpose: str, value: str) -> str:
        version, key = self.sealer.current(self.owner_key)
        return cipher.seal_token(key, version, value.encode("utf-8"), _ad(self.owner_key, purpose))

    def open_text(self, purpose: str, token: str) -> str:
        try:
            key = self.sealer.key(self.owner_key, cipher.token_version(token))
            return cipher.open_token(key, token, _ad(self.owner_key, purpose)).decode("utf-8")
        except SealBroken as exc:
            raise SealedDataUnreadable(f"stored {purpose} of this user does not open: {exc}") from exc

    def tag(self, value: str) -> str:
        """A keyed hash of user content the server must look up by (e.g. a client's idempotency id): equal
        values give equal tags for this owner; nothing about the value shows without their key."""
        version, tag_key = self.sealer.tag_key(self.owner_key)
        return _tag(version, tag_key, value)

    def tags(self, values: Sequence[str]) -> dict[str, list[str]]:
        """Each value's keyed hash under every live data-key version of the owner, the current one (what `tag`
        gives) first: a lookup during a key rotation matches a row hashed before it was re-sealed."""
        keys = self.sealer.tag_keys(self.owner_key)
        return {value: [_tag(version, tag_key, value) for version, tag_key in keys] for value in values}

    def seal_bytes(self, purpose: str, data: bytes) -> bytes:
        version, key = self.sealer.current(self.owner_key)
        return cipher.seal_bytes(key, version, data, _ad(self.owner_key, purpose))

    def open_bytes(self, purpose: str, blob: bytes | bytearray) -> bytearray:
        try:
            key = self.sealer.key(self.owner_key, cipher.file_version(blob[: cipher.HEADER]))
            return cipher.open_bytes(key, blob, _ad(self.owner_key, purpose))
        except SealBroken as exc:
            raise SealedDataUnreadable(f"the stored {purpose} of this user does not open: {exc}") from exc

    def open_path(self, purpose: str, path: Path | IO[bytes], allocate: Callable[[int], Any] = bytearray) -> Any:
        """A sealed file's plaintext, read and opened in one pass into `allocate(n)` (an adapter's cold load);
        `path` may be the file already open (cipher.open_file)."""
        try:  # the key of the version in the header of the file opened: one open (a re-seal may replace it)
            key_of = functools.partial(self.sealer.key, self.owner_key)
            return cipher.open_file(key_of, path, _ad(self.owner_key, purpose), allocate)
        except SealBroken as exc:
            raise SealedDataUnreadable(f"the stored {purpose} of this user does not open: {exc}") from exc

    def reader(self, purpose: str, raw: IO[bytes]) -> IO[bytes]:
        """A sealed file's plaintext, read in segments (seekable) from `raw`."""
        try:
            raw.seek(0)
            key = self.sealer.key(self.owner_key, cipher.file_version(raw.read(cipher.HEADER)))
            return _OwnedReader(raw, key, _ad(self.owner_key, purpose), purpose).as_io()
        except SealBroken as exc:
            raise SealedDataUnreadable(f"the stored {purpose} of this user does not open: {exc}") from exc


class _OwnedReader(cipher.SealedReader):
    """A sealed file read in segments: a segment that does not open is the request's clean error too."""

    def __init__(self, raw: IO[bytes], key: bytes, ad: bytes, purpose: str) -> None:
        super().__init__(raw, key, ad)
        self._purpose = purpose

    def _segment(self, index: int) -> bytes:
        try:
            return super()._segment(index)
        except SealBroken as exc:
            raise SealedDataUnreadable(f"the stored {self._purpose} of this user does not open: {exc}") from exc
