"""The vLLM engine's LoRA folders without vLLM (`engine/vllm/loras.py` imports none of it): a folder being built
for a request resolved before its owner's erase is never registered nor left on disk (issue 23 N11), while a
folder built across a retrain's drop (its version still stored) is served as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.adapters.peft_format import WEIGHTS_NAME, AdapterWeights
from service.engine.types import AdapterRef
from service.engine.vllm.loras import LoraFolders
from service.errors import AdapterUnavailable
from tests.factories import make_adapter
from tests.models import tiny_model

OWNER = "0123456789abcdef0123456789abcdef"


class DroppedWhileBuilding(LoraFolders):
    """Between reading the store and registering the folder, the owner is dropped (the erase/retrain notice,
    which on a real server arrives on another thread at any moment); `erase` also removes the store's files
    first, as an erase does before its notice."""

    def __init__(self, work_dir: Path, *, erase: bool) -> None:
        super().__init__(work_dir, max_rank=64, max_scale=256.0, keep=8, base_model_name="tiny")
        self.erase = erase
        self.dropped: list[str] = []

    def _read(self, ref: AdapterRef) -> AdapterWeights:
        weights = super()._read(ref)
        if ref.owner_key == OWNER and not self.dropped:
            if self.erase:
                shutil.rmtree(ref.directory)
            self.dropped += [s.name for s in self.drop_owner(OWNER)]
        return weights


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model(), tmp_path_factory.mktemp("store") / "v1", seed=1, r=4, targets=("q_proj",))


def _ref(adapter_dir: Path, tmp_path: Path) -> AdapterRef:
    stored = tmp_path / "store" / OWNER / "v1"
    shutil.copytree(adapter_dir, stored)
    return AdapterRef(OWNER, 1, "sha-of-v1", stored)


def _folders_left(work_dir: Path) -> list[str]:
    return sorted(p.name for p in work_dir.iterdir())


def test_a_folder_resolved_before_an_erase_is_never_registered(adapter_dir: Path, tmp_path: Path) -> None:
    ref = _ref(adapter_dir, tmp_path)
    folders = DroppedWhileBuilding(tmp_path / "work", erase=True)
    with pytest.raises(AdapterUnavailable, match="removed meanwhile"):
        folders.resolve(ref, None)
    assert folders._served == {} and folders._inflight == {}
    assert _folders_left(tmp_path / "work") == []  # neither the folder nor its temp copy stays on disk
    with pytest.raises(AdapterUnavailable):  # and a later request cannot rebuild it: the version is gone
        LoraFolders(tmp_path / "work2", max_rank=64, max_scale=256.0, keep=8, base_model_name="t").resolve(ref, None)


def test_a_folder_built_across_a_retrains_drop_is_still_served(adapter_dir: Path, tmp_path: Path) -> None:
    ref = _ref(adapter_dir, tmp_path)
    folders = DroppedWhileBuilding(tmp_path / "work", erase=False)
    served = folders.resolve(ref, None)
    assert served is not None and served.owner_key == OWNER
    assert (served.path / WEIGHTS_NAME).is_file()
    assert list(folders._served.values()) == [served] and folders._inflight == {}
    # The next drop forgets it as usual (the engine then deletes the folder once no row uses it).
    assert folders.drop_owner(OWNER) == [served]


def test_without_a_drop_the_folder_is_registered_once(adapter_dir: Path, tmp_path: Path) -> None:
    ref = _ref(adapter_dir, tmp_path)
    folders = LoraFolders(tmp_path / "work", max_rank=64, max_scale=256.0, keep=8, base_model_name="tiny")
    first, again = folders.resolve(ref, None), folders.resolve(ref, None)
    assert first is not None and first == again
    assert _folders_left(tmp_path / "work") == [first.name]


def _folders(tmp_path: Path, keep: int = 8) -> LoraFolders:
    return LoraFolders(tmp_path / "work", max_rank=64, max_scale=256.0, keep=keep, base_model_name="tiny")


def test_a_reregistered_lora_gets_its_own_name_and_folder(adapter_dir: Path, tmp_path: Path) -> None:
    # The same version resolved again after a drop (a notice applied twice; the same bytes uploaded again)
    # while a row still runs on the dropped entry: one name for two ids made vLLM fail the whole step, and
    # one folder for both made the dropped entry's deletion take the live one's files.
    ref = _ref(adapter_dir, tmp_path)
    folders = _folders(tmp_path)
    old = folders.resolve(ref, None)
    assert old is not None and folders.drop_owner(OWNER) == [old]
    new = folders.resolve(ref, None)
    assert new is not None and new.lora_id != old.lora_id
    assert new.name != old.name and new.path != old.path
    LoraFolders.delete(old)  # what the engine does once the old entry's last row ends
    assert (new.path / WEIGHTS_NAME).is_file()


def test_the_same_bytes_under_two_owners_or_versions_are_two_loras(adapter_dir: Path, tmp_path: Path) -> None:
    # Keyed by the weights' hash alone, a second owner got the first's folder (its scale, and an owner_key
    # that the second owner's drop never matched).
    ref = _ref(adapter_dir, tmp_path)
    other = AdapterRef("f" * 32, 1, ref.sha256, ref.directory)
    newer = AdapterRef(OWNER, 2, ref.sha256, ref.directory)
    folders = _folders(tmp_path)
    served = [folders.resolve(r, None) for r in (ref, other, newer)]
    assert len({s.lora_id for s in served if s is not None}) == 3
    assert served[1] is not None and served[1].owner_key == "f" * 32
    assert folders.drop_owner("f" * 32) == [served[1]]


def test_a_just_resolved_lora_is_not_evicted_before_its_row_is_queued(
    adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine.vllm import loras

    refs = [AdapterRef(f"{i:032x}", 1, "sha", _ref_copy(adapter_dir, tmp_path, i)) for i in range(3)]
    folders = _folders(tmp_path, keep=1)
    served = [folders.resolve(r, None) for r in refs]
    assert folders.evictable(set()) == []  # resolved just now: their rows may still be on the way to the queue
    monkeypatch.setattr(loras, "RESOLVE_GRACE_S", 0.0)
    assert folders.evictable(set()) == served[:2]  # least recently resolved first, down to `keep`


def _ref_copy(adapter_dir: Path, tmp_path: Path, i: int) -> Path:
    stored = tmp_path / "store" / f"owner{i}" / "v1"
    shutil.copytree(adapter_dir, stored)
    return stored
