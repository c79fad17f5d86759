"""The adapter store on disk: the ONLY module that builds paths under the store root.

Layout: ``root/users/<storage_key>/v<version:06d>/`` and ``root/shared/v<version:06d>/`` (the shared
task LoRA), each holding exactly the PEFT pair. Versions are immutable and published atomically
(temp dir in ``root/tmp`` -> fsync -> rename). It knows nothing of users, SQL or what the weights mean.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import IO

from service.adapters.peft_format import CONFIG_NAME, PEFT_FILES, WEIGHTS_NAME

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


class AdapterStore:
    """Immutable, atomically published adapter versions under one root directory."""

    def __init__(self, root: Path) -> None:
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
            return self._read_dir(d)
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
            yield files

    def sha256(self, storage_key: str, version: int) -> str:
        path = self._inside(self.version_dir(storage_key, version) / WEIGHTS_NAME)
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except FileNotFoundError as e:
            raise VersionNotFoundError(f"adapter {storage_key} v{version} not found") from e
        return h.hexdigest()

    # --- writes ---
    def publish(self, storage_key: str, version: int, files: Mapping[str, bytes]) -> Path:
        """Write a version atomically; idempotent for identical content, else VersionExistsError."""
        staged = self.stage(files)
        try:
            return self.commit_staged(staged, storage_key, version)
        finally:
            self.discard(staged)

    def stage(self, files: Mapping[str, bytes]) -> Path:
        """Write and fsync the PEFT pair in a temp dir of the store (slow: do it before taking any lock)."""
        _check_files(files)
        tmp = Path(tempfile.mkdtemp(prefix="staged-", dir=self._tmp))
        try:
            for name in PEFT_FILES:
                _write_fsync(tmp / name, bytes(files[name]))
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def commit_staged(self, staged: Path, storage_key: str, version: int) -> Path:
        """Move a staged pair into place as `version` (a rename: fast); idempotent for identical content."""
        staged = self._inside(staged)
        target = self.version_dir(storage_key, version)
        if target.exists():
            return self._same_or_raise(storage_key, version, self._read_dir(staged))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, target)  # fails on Linux if target exists and is non-empty
        except OSError:
            if target.exists():  # a concurrent publisher won the race
                return self._same_or_raise(storage_key, version, self._read_dir(staged))
            raise
        _fsync_dir(target.parent)
        _fsync_dir(target.parent.parent)
        return target

    def discard(self, staged: Path) -> None:
        """Remove a staged dir that was not committed (no-op once it was)."""
        staged = self._inside(staged)
        if staged.parent == self._tmp and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)

    def _read_dir(self, directory: Path) -> dict[str, bytes]:
        return {name: (directory / name).read_bytes() for name in sorted(PEFT_FILES)}

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
