"""Tiered adapter cache: device slots (LoraSlots) <- host RAM (LRU, byte budget) <- disk (AdapterStore).

Keys are AdapterRefs (owner, version, sha256; loaded from their version directory), so a new version can
never be served from a stale entry. Slots
are taken by the batch thread only (acquire/release around each batch); an adapter in use by the
running batch is pinned and never evicted. Every eviction goes through `_evict`, the one hook.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from service.adapters.peft_format import AdapterWeights, read_adapter_dir
from service.adapters.slots import LoraSlots
from service.engine.types import AdapterRef
from service.errors import AdapterUnavailable, ServiceError
from service.forgetting import InvalidationLog

log = logging.getLogger(__name__)


AdapterKey = AdapterRef  # the cache's key: one immutable adapter version


class SlotsBusy(RuntimeError):
    """Every adapter slot is pinned by running rows: a row with yet another adapter must wait."""


@dataclass(frozen=True)
class Resident:
    """One adapter version held by a tier (for /metrics): slot = device slots, host = host RAM."""

    key: AdapterKey
    tier: str
    pinned: bool
    rank: int


DROPS_KEPT = 4096  # owners whose last drop the cache remembers (a read older than a forgotten one is not kept)

# (event, tier, seconds): event in {hit, miss, evict, load}; tier in {slot, host}
CacheEvent = Callable[[str, str, float], None]


class AdapterCache:
    def __init__(
        self,
        slots: LoraSlots,
        *,
        host_budget_bytes: int,
        max_scale: float = 256.0,
        on_event: CacheEvent | None = None,
    ) -> None:
        self._slots = slots
        self._budget = host_budget_bytes
        self._max_scale = max_scale  # re-checked at load: the files on disk are not trusted blindly
        self._on_event = on_event
        self._lock = threading.RLock()
        self._host: OrderedDict[AdapterKey, AdapterWeights] = OrderedDict()
        self._host_bytes = 0
        self._slot_of: OrderedDict[AdapterKey, int] = OrderedDict()  # LRU order: oldest first
        self._free = list(range(slots.num_slots, 0, -1))  # slot 0 is the base (all zeros)
        self._pins: Counter[AdapterKey] = Counter()
        self._loading: dict[AdapterKey, threading.Lock] = {}  # per-key single flight of disk reads
        # Weights read before an owner's drop are not kept after it, in host RAM or in a slot (`_kept`).
        self._dropped = InvalidationLog(DROPS_KEPT)
        self._doomed: set[AdapterKey] = set()  # dropped while pinned: evicted when the last pin goes

    # --- introspection ---
    @property
    def num_slots(self) -> int:
        return self._slots.num_slots

    def slot_keys(self) -> dict[AdapterKey, int]:
        with self._lock:
            return dict(self._slot_of)

    def host_keys(self) -> list[AdapterKey]:
        with self._lock:
            return list(self._host)

    def pinned(self) -> dict[AdapterKey, int]:
        with self._lock:
            return {k: n for k, n in self._pins.items() if n > 0}

    def residency(self) -> list[Resident]:
        """Every adapter in a slot, then every one in host RAM (one adapter can be in both)."""
        with self._lock:
            layers = list(self._slots.layers.values())
            out = [
                Resident(k, "slot", self._pins[k] > 0, max((layer.ranks[slot] for layer in layers), default=0))
                for k, slot in self._slot_of.items()
            ]
            out += [Resident(k, "host", False, w.rank) for k, w in self._host.items()]
        return out

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    def _kept(self, key: AdapterKey, since: int) -> bool:
        """THE rule of both tiers, under the cache lock: weights read since `since` (the drop log's token, taken
        before the read) may be kept unless the key's owner was dropped meanwhile; if it was, they serve the
        read that asked for them once and go (an erased user's weights must not stay resident until LRU)."""
        return not self._dropped.since(key.owner_key, since)

    def _event(self, event: str, tier: str, seconds: float = 0.0) -> None:
        if self._on_event is not None:
            self._on_event(event, tier, seconds)

    # --- host tier ---
    def _load_disk(self, key: AdapterKey) -> AdapterWeights:
        start = time.perf_counter()
        weights = read_adapter_dir(key.directory, max_scale=self._max_scale, seal=key.seal)
        self._event("load", "host", time.perf_counter() - start)
        return weights

    def _host_hit(self, key: AdapterKey) -> AdapterWeights | None:
        with self._lock:
            weights = self._host.get(key)
            if weights is not None:
                self._host.move_to_end(key)
                self._event("hit", "host")
            return weights

    def host_weights(self, key: AdapterKey) -> AdapterWeights:
        """The adapter from host RAM, reading it from disk on a miss (outside the cache lock). One read per
        key at a time: requests that miss the same adapter together wait for the first one's read."""
        weights = self._host_hit(key)
        if weights is not None:
            return weights
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        try:
            with loading:
                weights = self._host_hit(key)  # read by the request we waited for
                if weights is not None:
                    return weights
                self._event("miss", "host")
                with self._lock:
                    since = self._dropped.token()
                weights = self._load_disk(key)
                with self._lock:
                    # dropped meanwhile: used for this read once, not kept
                    if key not in self._host and self._kept(key, since):
                        self._admit_host(key, weights)
                return weights
        finally:
            with self._lock:
                if self._loading.get(key) is loading and not loading.locked():
                    del self._loading[key]

    def prefetch(self, key: AdapterKey) -> None:
        """Warm the host tier from a request thread, so the batch thread only does a tensor copy.
        An adapter that cannot be read fails this request here (503), before it takes a batch row."""
        with self._lock:
            if key in self._slot_of or key in self._host:
                return
        try:
            self.host_weights(key)
        except ServiceError:  # already the request's answer (the owner erased meanwhile: 410 user_data_erased)
            raise
        except Exception as exc:  # files missing (pruned) or damaged: OSError, SafetensorError, ValueError...
            log.warning("adapter %s v%d could not be loaded: %r", key.owner_key, key.version, exc)
            raise AdapterUnavailable(exc) from exc

    def _admit_host(self, key: AdapterKey, weights: AdapterWeights) -> None:
        size = weights.nbytes()
        if size > self._budget:
            return  # larger than the whole budget: served from disk each time it is not in a slot
        while self._host and self._host_bytes + size > self._budget:  # evict before load
            self._evict(next(iter(self._host)), "host")
        self._host[key] = weights
        self._host_bytes += size

    # --- slot tier (batch thread) ---
    def acquire(self, keys: Sequence[Hashable | None]) -> list[int]:
        """Slots for each row's adapter (0 for None), pinned until release(keys)."""
        with self._lock:
            since = self._dropped.token()  # before any read below (host RAM or disk)
            missing = [k for k in keys if isinstance(k, AdapterKey) and k not in self._slot_of]
            for _ in missing:
                self._event("miss", "slot")
            if missing and not self._free and all(self._pins[k] > 0 for k in self._slot_of):
                raise SlotsBusy("every adapter slot is pinned by in-flight requests")  # before any read
        # Read outside the cache lock, through the per-key single flight: a request thread reading the same
        # adapter (prefetch) holds the key's load lock and then needs the cache lock to store it, so waiting
        # for that load lock while holding the cache lock deadlocked the engine thread and that request.
        read = {key: self.host_weights(key) for key in dict.fromkeys(missing)}
        out: list[int] = []
        with self._lock:
            try:
                for key in keys:
                    if key is None:
                        out.append(0)
                        continue
                    assert isinstance(key, AdapterKey)
                    slot = self._slot_of.get(key)
                    if slot is None:
                        slot = self._load_slot(key, read.get(key))
                        if not self._kept(key, since):  # this batch uses it; its last release evicts it
                            self._doomed.add(key)
                    else:
                        self._slot_of.move_to_end(key)
                        self._event("hit", "slot")
                    self._pins[key] += 1
                    out.append(slot)
            except BaseException:
                # All or nothing: the caller does not release a batch whose acquire failed.
                self.release(keys[: len(out)])
                raise
        return out

    def release(self, keys: Sequence[Hashable | None]) -> None:
        with self._lock:
            for key in keys:
                if isinstance(key, AdapterKey) and self._pins[key] > 0:
                    self._pins[key] -= 1
                    if self._pins[key] == 0:
                        del self._pins[key]
                        if key in self._doomed:  # dropped while its rows ran: it goes with the last of them
                            self._doomed.discard(key)
                            if key in self._slot_of:
                                self._evict(key, "slot")

    def _load_slot(self, key: AdapterKey, weights: AdapterWeights | None) -> int:
        """Under the cache lock. `weights`: read before the lock was taken; None only when this same acquire
        evicted the key since (then from host RAM or straight from disk: never waiting on a load lock here)."""
        if not self._free:
            victim = next((k for k in self._slot_of if self._pins[k] == 0), None)
            if victim is None:
                raise SlotsBusy("every adapter slot is pinned by in-flight requests")
            self._evict(victim, "slot")
        if weights is None:
            weights = self._host_hit(key) or self._load_disk(key)
        slot = self._free.pop()
        start = time.perf_counter()
        try:
            self._slots.load(slot, weights)
        except BaseException:
            self._free.append(slot)
            raise
        self._event("load", "slot", time.perf_counter() - start)
        self._slot_of[key] = slot
        return slot

    # --- eviction: the one hook ---
    def _evict(self, key: AdapterKey, tier: str) -> None:
        if tier == "slot":
            if self._pins[key] > 0:
                raise RuntimeError("refusing to evict a pinned adapter")
            slot = self._slot_of.pop(key)
            self._doomed.discard(key)
            self._free.append(slot)  # the slot is overwritten (all modules) by the next load
        else:
            weights = self._host.pop(key)
            self._host_bytes -= weights.nbytes()
        self._event("evict", tier)

    def drop_owner(self, owner_key: str, *, keep: AdapterKey | None = None) -> None:
        """Forget an owner's entries (deleted adapter/user, or versions older than `keep`).
        Pinned slot entries stay until their last row ends, then go; a disk read in flight is not kept."""
        with self._lock:
            self._dropped.note(owner_key)
            for key in [k for k in self._host if k.owner_key == owner_key and k != keep]:
                self._evict(key, "host")
            for key in [k for k in self._slot_of if k.owner_key == owner_key and k != keep]:
                if self._pins[key] == 0:
                    self._evict(key, "slot")
                else:
                    self._doomed.add(key)
