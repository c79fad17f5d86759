"""The adapter store on disk: the ONLY module that builds paths under the store root.

Layout: ``root/users/<storage_key>/v<version:06d>/`` and ``root/shared/v<version:06d>/`` (the shared
task LoRA), each holding exactly the PEFT pair. Versions are immutable and published atomically
(temp dir in ``root/tmp`` -> fsync -> rename). With a sealer, every file is written sealed under its owner's
data key and bound to (owner, file name) (service.sealing: a segmented format, read and streamed in chunks);
reads open sealed and plaintext files alike (a store sealed in place by `oppu keys seal-existing` holds both
for a while). It knows nothing of users, SQL or what the weights mean.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

from service.adapters.peft_format import CONFIG_NAME, PEFT_FILES, WEIGHTS_NAME, file_purpose
from service.sealing import cipher

SHARED_KEY = "_shared"  # reserved key of the shared task LoRA; user keys are hex and never collide

_KEY_RE = re.compile(r"[a-z0-9_]{1,64}")
_VERSION_RE = re.compile(r"v(\d{6,})")


class AdapterStoreError(Exception):
    """Base class of store errors."""


class VersionExistsError(AdapterStoreError):
    """A version already exists with different content (versions are immutable)."""


class VersionNotFoundError(AdapterStoreError, FileNotFoundError):
    """The requested version is not in the store."""


def validate_storage_key(storage_key: str) -> str:
    if not isinstance(storage_key, str) or not _KEY_RE.fullmatch(storage_key):
        raise ValueError(f"invalid storage key {storage_key!r}: need [a-z0-9_]{{1,64}}")
    return storage_key


def _check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"invalid adapter version {version!r}: need a positive int")
    return version


def _check_files(files: Mapping[str, bytes]) -> None:
    if set(files) != PEFT_FILES:
        raise ValueError(f"an adapter is exactly {sorted(PEFT_FILES)}, got {sorted(files)}")
    for name, data in files.items():
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"{name}: content must be bytes")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_fsync(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSeal(Protocol):
    """One owner's file sealing (service.sealing.service.UserSeal)."""

    @property
    def enabled(self) -> bool: ...

    def seal_bytes(self, purpose: str, data: bytes) -> bytes: ...

    def open_bytes(self, purpose: str, blob: bytes | bytearray) -> bytearray: ...

    def newest_version(self) -> int: ...

    def open_path(self, purpose: str, path: Path | IO[bytes], allocate: Callable[[int], Any] = ...) -> Any: ...

    def reader(self, purpose: str, raw: IO[bytes]) -> IO[bytes]: ...


class FileSealer(Protocol):
    def user(self, owner_key: str) -> FileSeal: ...


def _head(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


def open_file_bytes(seal: FileSeal | None, name: str, blob: bytes) -> bytes:
    """A stored file's plaintext: sealed ones through the owner's seal, plaintext ones as they are."""
    if not cipher.is_sealed_file(blob):
        return blob
    return bytes(_required(seal).open_bytes(file_purpose(name), blob))


def _required(seal: FileSeal | None) -> FileSeal:
    if seal is None:
        raise cipher.SealBroken("a sealed adapter file met without its owner's key")
    return seal


class AdapterStore:
    """Immutable, atomically published adapter versions under one root directory."""

    def __init__(self, root: Path, sealer: FileSealer | None = None) -> None:
        self._sealer = sealer
        self.root = Path(root).resolve()
        self._tmp = self.root / "tmp"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # owner-only: users' adapters
        for d in (self.root / "users", self.root / "shared", self._tmp):
            d.mkdir(mode=0o700, exist_ok=True)

    # --- paths (every one goes through _inside) ---
    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise ValueError(f"path {path} escapes the adapter store root")
        return resolved

    def key_dir(self, storage_key: str) -> Path:
        validate_storage_key(storage_key)
        if storage_key == SHARED_KEY:
            return self._inside(self.root / "shared")
        return self._inside(self.root / "users" / storage_key)

    def version_dir(self, storage_key: str, version: int) -> Path:
        return self._inside(self.key_dir(storage_key) / f"v{_check_version(version):06d}")

    def seal(self, storage_key: str) -> FileSeal | None:
        """The owner's file seal (None: this store has no sealer)."""
        return self._sealer.user(validate_storage_key(storage_key)) if self._sealer is not None else None

    @property
    def sealing(self) -> bool:
        """Whether new files are written sealed."""
        return self._sealer is not None and self._sealer.user(SHARED_KEY).enabled

    # --- reads ---
    def exists(self, storage_key: str, version: int) -> bool:
        d = self.version_dir(storage_key, version)
        return all((d / name).is_file() for name in PEFT_FILES)

    def list_versions(self, storage_key: str) -> list[int]:
        d = self.key_dir(storage_key)
        if not d.is_dir():
            return []
        versions = []
        for entry in d.iterdir():
            m = _VERSION_RE.fullmatch(entry.name)
            if m and entry.name == f"v{int(m.group(1)):06d}" and int(m.group(1)) > 0 and entry.is_dir():
                versions.append(int(m.group(1)))
        return sorted(versions)

    def age_s(self, storage_key: str, version: int) -> float:
        """Seconds since the version dir was last changed (its publish)."""
        try:
            return time.time() - self.version_dir(storage_key, version).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def list_storage_keys(self) -> list[str]:
        """User storage keys that have a folder (for garbage collection); excludes the shared key."""
        users = self.root / "users"
        return sorted(p.name for p in users.iterdir() if p.is_dir() and _KEY_RE.fullmatch(p.name))

    def read_files(self, storage_key: str, version: int) -> dict[str, bytes]:
        d = self.version_dir(storage_key, version)
        try:
            return self._read_dir(d, storage_key)
        except FileNotFoundError as e:
            raise VersionNotFoundError(f"adapter {storage_key} v{version} not found") from e

    @contextlib.contextmanager
    def open_files(self, storage_key: str, version: int) -> Iterator[dict[str, IO[bytes]]]:
        """A version's files opened for reading (streamed by downloads: never read whole). Once open they stay
        readable even if the version is pruned meanwhile; a version already gone is VersionNotFoundError."""
        d = self.version_dir(storage_key, version)
        with contextlib.ExitStack() as stack:
            try:
                files: dict[str, IO[bytes]] = {
                    name: stack.enter_context(open(self._inside(d / name), "rb")) for name in sorted(PEFT_FILES)
                }
            except FileNotFoundError as e:
                raise VersionNotFoundError(f"adapter {storage_key} v{version} not found") from e
            yield {name: self._plain_reader(storage_key, name, fh) for name, fh in files.items()}

    def _plain_reader(self, storage_key: str, name: str, fh: IO[bytes]) -> IO[bytes]:
        if not cipher.is_sealed_file(fh.read(len(cipher.MAGIC))):
            fh.seek(0)
            return fh
        return _required(self.seal(storage_key)).reader(file_purpose(name), fh)

    def sha256(self, storage_key: str, version: int) -> str:
        """Of the weights' plaintext (what the SQL row records, sealed or not)."""
        h = hashlib.sha256()
        with self.open_files(storage_key, version) as files:
            for chunk in iter(lambda: files[WEIGHTS_NAME].read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    # --- writes ---
    def publish(self, storage_key: str, version: int, files: Mapping[str, bytes]) -> Path:
        """Write a version atomically; idempotent for identical content, else VersionExistsError."""
        staged = self.stage(files, storage_key)
        try:
            return self.commit_staged(staged, storage_key, version)
        finally:
            self.discard(staged)

    def stage(self, files: Mapping[str, bytes], storage_key: str) -> Path:
        """Write (sealed for `storage_key` when sealing) and fsync the PEFT pair in a temp dir of the store
        (slow: do it before taking any lock)."""
        _check_files(files)
        seal = self.seal(storage_key) if self.sealing else None
        tmp = Path(tempfile.mkdtemp(prefix="staged-", dir=self._tmp))
        try:
            for name in PEFT_FILES:
                data = bytes(files[name])
                _write_fsync(tmp / name, seal.seal_bytes(file_purpose(name), data) if seal is not None else data)
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def staged_is_stale(self, staged: Path, storage_key: str) -> bool:
        """Whether staged files are sealed under a data-key version older than the owner's newest, read from the
        keyring now. Staging happens outside any lock, possibly before a rotation's settle time ended, and the
        rotation destroys the old version once its sweeps find nothing under it: a publisher asks this holding
        the owner's lock (accounts.hold_for_sealed_write) and stages again if so (the old key may be gone
        already, so the files cannot be re-sealed from what was staged)."""
        if not self.sealing:
            return False
        seal = self.seal(storage_key)
        assert seal is not None
        newest = seal.newest_version()
        staged = self._inside(staged)
        return any(cipher.file_version(_head(staged / name, cipher.HEADER)) != newest for name in PEFT_FILES)

    def commit_staged(self, staged: Path, storage_key: str, version: int) -> Path:
        """Move a staged pair into place as `version` (a rename: fast); idempotent for identical content."""
        staged = self._inside(staged)
        target = self.version_dir(storage_key, version)
        if target.exists():
            return self._same_or_raise(storage_key, version, self._read_dir(staged, storage_key))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, target)  # fails on Linux if target exists and is non-empty
        except FileNotFoundError:
            if not staged.exists():
                raise
            # A delete removed the owner's empty folder between the mkdir and the rename (delete_versions).
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged, target)
        except OSError:
            if target.exists():  # a concurrent publisher won the race
                return self._same_or_raise(storage_key, version, self._read_dir(staged, storage_key))
            raise
        _fsync_dir(target.parent)
        _fsync_dir(target.parent.parent)
        return target

    def discard(self, staged: Path) -> None:
        """Remove a staged dir that was not committed (no-op once it was)."""
        staged = self._inside(staged)
        if staged.parent == self._tmp and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)

    def _read_dir(self, directory: Path, storage_key: str) -> dict[str, bytes]:
        seal = self.seal(storage_key)
        return {name: open_file_bytes(seal, name, (directory / name).read_bytes()) for name in sorted(PEFT_FILES)}

    def reseal_version(self, storage_key: str, version: int, current: int | None = None) -> bool:
        """Seal a version's plaintext files in place (`oppu keys seal-existing`), and with `current` also the
        files sealed under an older data-key version (a per-user key rotation): each file is replaced whole
        (temp file + fsync + rename), so a reader sees one or the other. False: nothing to do."""
        seal = self.seal(storage_key)
        if seal is None or not seal.enabled:
            return False
        d = self.version_dir(storage_key, version)
        changed = False
        for name in sorted(PEFT_FILES):
            path = self._inside(d / name)
            blob = path.read_bytes()
            if cipher.is_sealed_file(blob) and (current is None or cipher.file_version(blob) == current):
                continue
            plain = open_file_bytes(seal, name, blob)
            tmp = Path(tempfile.mkdtemp(prefix="reseal-", dir=self._tmp))
            try:
                _write_fsync(tmp / name, seal.seal_bytes(file_purpose(name), plain))
                os.replace(tmp / name, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            changed = True
        if changed:
            _fsync_dir(d)
        return changed

    def _same_or_raise(self, storage_key: str, version: int, data: Mapping[str, bytes]) -> Path:
        try:
            existing = self.read_files(storage_key, version)
        except VersionNotFoundError as e:
            raise VersionExistsError(f"adapter {storage_key} v{version} exists but is incomplete") from e
        same_weights = _sha256_bytes(existing[WEIGHTS_NAME]) == _sha256_bytes(data[WEIGHTS_NAME])
        if not same_weights or existing[CONFIG_NAME] != data[CONFIG_NAME]:
            raise VersionExistsError(f"adapter {storage_key} v{version} exists with different content")
        return self.version_dir(storage_key, version)

    def _remove(self, path: Path) -> bool:
        """Rename out of sight first so readers never see a half-deleted version."""
        path = self._inside(path)
        if not path.exists():
            return False
        grave = Path(tempfile.mkdtemp(prefix="deleted-", dir=self._tmp))
        os.rename(path, grave / "d")
        shutil.rmtree(grave, ignore_errors=True)
        return True

    def delete_version(self, storage_key: str, version: int) -> bool:
        return self._remove(self.version_dir(storage_key, version))

    def delete_versions(self, storage_key: str, versions: Collection[int]) -> None:
        """Remove these versions, then the owner's folder if nothing is left in it: a version committed
        meanwhile (not among these) keeps the folder and its files."""
        for version in versions:
            self.delete_version(storage_key, version)
        if storage_key != SHARED_KEY:
            with contextlib.suppress(OSError):  # not empty, or gone already
                self.key_dir(storage_key).rmdir()

    def delete_all(self, storage_key: str) -> bool:
        """Remove every version of one key (a deleted user). Returns whether anything was there."""
        removed = self._remove(self.key_dir(storage_key))
        if storage_key == SHARED_KEY:
            (self.root / "shared").mkdir(exist_ok=True)
        return removed

    def prune(self, storage_key: str, keep: Collection[int]) -> list[int]:
        """Delete every version not in keep; returns the deleted versions."""
        keep_set = {_check_version(v) for v in keep}
        doomed = [v for v in self.list_versions(storage_key) if v not in keep_set]
        for v in doomed:
            self.delete_version(storage_key, v)
        return doomed

    def cleanup_tmp(self, older_than_s: float) -> int:
        """Remove temp dirs left by crashed publishes/deletes older than older_than_s seconds."""
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.lstat().st_mtime < cutoff:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink()
                    removed += 1
        return removed
