"""The adapter store: atomic, idempotent, immutable publish; listing, pruning, deletion; safe paths."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from service.adapters.store import SHARED_KEY, AdapterStore, VersionExistsError, VersionNotFoundError

KEY = "3f2a9c0d1e"


def _files(seed: int = 0) -> dict[str, bytes]:
    return {CONFIG_NAME: b'{"r": 8}', WEIGHTS_NAME: bytes([seed]) * 1000}


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters_store")


def test_publish_and_read(store: AdapterStore) -> None:
    path = store.publish(KEY, 1, _files())
    assert path == store.root / "users" / KEY / "v000001"
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert store.read_files(KEY, 1) == _files()
    assert store.sha256(KEY, 1) == hashlib.sha256(_files()[WEIGHTS_NAME]).hexdigest()
    assert store.exists(KEY, 1) and not store.exists(KEY, 2)
    assert store.list_versions(KEY) == [1]
    assert list((store.root / "tmp").iterdir()) == []


def test_publish_is_idempotent_and_immutable(store: AdapterStore) -> None:
    first = store.publish(KEY, 1, _files())
    assert store.publish(KEY, 1, _files()) == first  # a retried job
    with pytest.raises(VersionExistsError):
        store.publish(KEY, 1, _files(seed=1))
    with pytest.raises(VersionExistsError):
        store.publish(KEY, 1, {**_files(), CONFIG_NAME: b'{"r": 4}'})
    assert store.read_files(KEY, 1) == _files()


def test_concurrent_identical_publishes(store: AdapterStore) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(store.publish(KEY, 7, _files()))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert store.read_files(KEY, 7) == _files()


def test_publish_requires_exactly_the_peft_pair(store: AdapterStore) -> None:
    with pytest.raises(ValueError):
        store.publish(KEY, 1, {WEIGHTS_NAME: b"x"})
    with pytest.raises(ValueError):
        store.publish(KEY, 1, {**_files(), "README.md": b"hi"})


def test_failed_publish_leaves_nothing(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.publish(KEY, 1, _files())
    monkeypatch.undo()
    assert store.list_versions(KEY) == [] and not store.exists(KEY, 1)
    assert list((store.root / "tmp").iterdir()) == []


def test_crash_leftover_temp_dir_is_never_a_version(store: AdapterStore) -> None:
    store.publish(KEY, 1, _files())
    leftover = store.root / "tmp" / f"{KEY}-v2-crashed"
    leftover.mkdir()
    (leftover / WEIGHTS_NAME).write_bytes(b"partial")
    (store.root / "users" / KEY / "v2").mkdir()  # junk names are not versions either
    (store.root / "users" / KEY / ".v000003.tmp").mkdir()
    assert store.list_versions(KEY) == [1]
    assert store.cleanup_tmp(older_than_s=3600) == 0  # fresh: may be an in-flight publish
    assert store.cleanup_tmp(older_than_s=-1) == 1
    assert not leftover.exists() and store.read_files(KEY, 1) == _files()


def test_list_prune_delete(store: AdapterStore) -> None:
    for v in (1, 2, 3, 4):
        store.publish(KEY, v, _files(v))
    store.publish("other", 1, _files())
    assert store.list_versions(KEY) == [1, 2, 3, 4]
    assert store.prune(KEY, keep={3, 4}) == [1, 2]
    assert store.list_versions(KEY) == [3, 4]
    assert store.delete_version(KEY, 3) and not store.delete_version(KEY, 3)
    with pytest.raises(VersionNotFoundError):
        store.read_files(KEY, 3)
    assert store.list_storage_keys() == sorted([KEY, "other"])
    assert store.delete_all(KEY)
    assert not (store.root / "users" / KEY).exists() and store.list_versions(KEY) == []
    assert not store.delete_all(KEY)
    assert store.list_versions("other") == [1]
    assert list((store.root / "tmp").iterdir()) == []


def test_delete_versions_keeps_the_folder_of_a_version_committed_meanwhile(store: AdapterStore) -> None:
    store.publish(KEY, 1, _files(1))
    store.publish(KEY, 2, _files(2))  # committed after the delete listed v1
    store.delete_versions(KEY, [1])
    assert store.list_versions(KEY) == [2] and store.read_files(KEY, 2) == _files(2)
    store.delete_versions(KEY, [2])
    assert not (store.root / "users" / KEY).exists()  # nothing left: the folder goes too
    store.delete_versions(KEY, [2])  # again: nothing to do


def test_a_publish_whose_folder_a_delete_removed_before_its_rename_still_lands(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = store.stage(_files(3), KEY)
    real_rename = os.rename
    calls: list[str] = []

    def folder_removed_first(src: str, dst: str) -> None:
        if not calls:  # delete_versions emptied and removed the owner's folder after commit_staged's mkdir
            os.rmdir(Path(dst).parent)
        calls.append(str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", folder_removed_first)
    store.commit_staged(staged, KEY, 3)
    monkeypatch.undo()
    assert len(calls) == 2 and store.read_files(KEY, 3) == _files(3)


def test_shared_key_has_its_own_folder(store: AdapterStore) -> None:
    path = store.publish(SHARED_KEY, 1, _files())
    assert path == store.root / "shared" / "v000001"
    assert store.list_versions(SHARED_KEY) == [1]
    assert store.list_storage_keys() == []
    store.delete_all(SHARED_KEY)
    assert store.list_versions(SHARED_KEY) == []


@pytest.mark.parametrize("key", ["../x", "Alice", "a/b", "", "x" * 65, "a\n", "a.b", "..", "/etc"])
def test_invalid_storage_keys(store: AdapterStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.version_dir(key, 1)
    with pytest.raises(ValueError):
        store.publish(key, 1, _files())
    with pytest.raises(ValueError):
        store.delete_all(key)


@pytest.mark.parametrize("version", [0, -1, True, 1.5])
def test_invalid_versions(store: AdapterStore, version: int) -> None:
    with pytest.raises(ValueError):
        store.version_dir(KEY, version)


def test_paths_escaping_root_are_refused(store: AdapterStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "users" / KEY).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="escapes"):
        store.version_dir(KEY, 1)
    with pytest.raises(ValueError, match="escapes"):
        store.delete_all(KEY)
    assert outside.exists()
