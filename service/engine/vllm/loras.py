"""The vLLM engine's adapters: what LoRA a row runs (user ⊕ shared, the shared alone, or none), its folder
and its vLLM integer id.

Why rank concatenation for the shared task LoRA: vLLM runs ONE LoRA per row, and the builtin engine serves
base + shared + user. Merging the shared LoRA into vLLM's base weights would mean reloading the model on every
shared retrain; serving [A_s; A_u], [s_s B_s, s_u B_u] as one LoRA gives the same sum for each row with a rank
of r_s + r_u and lets rows on old and new shared versions run side by side.

Every served LoRA is a derived folder (the PEFT pair written by `peft_format.save_adapter_dir`, scales folded,
patterns resolved as our parser reads them), found by a digest of the versions in it (owner, version number and
weights hash of each: the same bytes under two owners or two versions are two entries, never one with the
other's scale or owner), so a retrain or a new shared version is a new folder and a new id, never a stale vLLM
cache entry. Each registration has its own id, name and folder (`<digest>-<id>`): vLLM takes requests with one
name for one LoRA, and a dropped entry still running must not share a folder with its successor, whose files
its deletion would take. Ids are never reused within the process. Folders live under the engine's work dir
(never a raw user id in a path) and go when their owner is dropped (erase, delete, rollback) or when evicted;
an entry resolved less than RESOLVE_GRACE_S ago is not evicted (its row may not be queued yet). A folder being
built while its owner is dropped is checked before it is registered: if its version left the store meanwhile
(an erase or a delete removes the files before its notice), the folder is deleted and the request fails (503),
so a request resolved before an erase never re-adds the erased user's weights.

Knows PEFT files and our AdapterRef; nothing of HTTP, SQL or vLLM's engine loop.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.adapters.peft_format import AdapterWeights, concat_lora, read_adapter_dir, save_adapter_dir
from service.engine.types import AdapterRef
from service.errors import AdapterUnavailable

RESOLVE_GRACE_S = 30.0  # a resolved entry's row reaches the engine's queue within this (request thread -> submit)


def lora_digest(user: AdapterRef | None, shared: AdapterRef | None) -> str:
    """The key of the LoRA a row runs: every part's owner, version and weights hash."""
    parts = [f"{r.owner_key}:{r.version}:{r.sha256}" if r is not None else "-" for r in (user, shared)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ServedLora:
    lora_id: int  # vLLM's lora_int_id: unique per (user version, shared version) in this process
    name: str
    path: Path
    owner_key: str | None  # the user's storage key; None for the shared LoRA alone
    rank: int


class LoraFolders:
    def __init__(self, work_dir: Path, *, max_rank: int, max_scale: float, keep: int, base_model_name: str) -> None:
        self._dir = work_dir
        self._max_rank = max_rank
        self._max_scale = max_scale
        self._keep = keep
        self._base = base_model_name
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._served: OrderedDict[str, ServedLora] = OrderedDict()  # digest -> served, least recent first
        self._resolved_at: dict[str, float] = {}  # digest -> time.monotonic() of its last resolve
        self._inflight: dict[str, set[threading.Event]] = {}  # owner -> folders being built (set: dropped since)
        shutil.rmtree(work_dir, ignore_errors=True)  # derived data of an earlier process
        work_dir.mkdir(parents=True, exist_ok=True)

    def resolve(self, user: AdapterRef | None, shared: AdapterRef | None) -> ServedLora | None:
        """The LoRA a row with this user adapter on this shared version runs (None: the bare base model).
        Reads and writes files: call it from a request thread. AdapterUnavailable if a version cannot be read
        or the sum is above the engine's max LoRA rank."""
        if user is None and shared is None:
            return None
        digest = lora_digest(user, shared)
        with self._lock:
            if digest in self._served:
                self._served.move_to_end(digest)
                self._resolved_at[digest] = time.monotonic()
                return self._served[digest]
        owner = user.owner_key if user is not None else None
        with self._building(owner) as dropped:  # from the first read of the store to the folder's registration
            parts = [self._read(ref) for ref in (shared, user) if ref is not None]
            weights = concat_lora(parts) if len(parts) > 1 else parts[0]
            if weights.rank > self._max_rank:
                raise AdapterUnavailable(
                    f"LoRA rank {weights.rank} (user + shared) is above the vLLM engine's OPPU_VLLM_MAX_LORA_RANK "
                    f"{self._max_rank}"
                )
            # One temp folder per call: two requests of the same user may build the same folder at once.
            tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=self._dir))
            try:
                save_adapter_dir(weights, tmp, self._base)
                with self._lock:
                    if dropped.is_set() and not all(r.directory.is_dir() for r in (user, shared) if r is not None):
                        # The owner was dropped while this folder was built, and its version has left the store
                        # (erased or deleted): never served, never left on disk (N11).
                        raise AdapterUnavailable("the adapter was removed meanwhile")
                    if digest not in self._served:
                        lora_id = next(self._ids)
                        path = self._dir / f"{digest}-{lora_id}"
                        tmp.replace(path)
                        self._served[digest] = ServedLora(lora_id, path.name, path, owner, weights.rank)
                    self._resolved_at[digest] = time.monotonic()
                    return self._served[digest]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # renamed into place already, or not wanted

    @contextmanager
    def _building(self, owner: str | None) -> Iterator[threading.Event]:
        """While a request thread builds a folder holding this owner's weights: an event `drop_owner` sets."""
        dropped = threading.Event()
        if owner is None:
            yield dropped
            return
        with self._lock:
            self._inflight.setdefault(owner, set()).add(dropped)
        try:
            yield dropped
        finally:
            with self._lock:
                left = self._inflight.get(owner, set())
                left.discard(dropped)
                if not left:
                    self._inflight.pop(owner, None)

    def _read(self, ref: AdapterRef) -> AdapterWeights:
        try:
            return read_adapter_dir(ref.directory, max_scale=self._max_scale, seal=ref.seal)
        except Exception as exc:
            raise AdapterUnavailable(exc) from exc

    def evictable(self, in_use: set[int]) -> list[ServedLora]:
        """Folders past the keep limit (least recently resolved first) that no running row uses: forgotten
        here; the caller removes them from vLLM, then deletes the folders (`delete`)."""
        recent = time.monotonic() - RESOLVE_GRACE_S
        with self._lock:
            out = []
            for digest, served in list(self._served.items()):
                if len(self._served) <= self._keep:
                    break
                if served.lora_id not in in_use and self._resolved_at.get(digest, 0.0) < recent:
                    out.append(self._served.pop(digest))
                    self._resolved_at.pop(digest, None)
            return out

    def drop_owner(self, owner_key: str) -> list[ServedLora]:
        """Forget every LoRA holding this user's weights (erase, delete, retrain): the caller removes them from
        vLLM and deletes the folders."""
        with self._lock:
            for building in self._inflight.get(owner_key, ()):
                building.set()  # a folder being built now is checked before it is registered
            gone = [d for d, s in self._served.items() if s.owner_key == owner_key]
            for d in gone:
                self._resolved_at.pop(d, None)
            return [self._served.pop(d) for d in gone]

    @staticmethod
    def delete(served: ServedLora) -> None:
        shutil.rmtree(served.path, ignore_errors=True)
