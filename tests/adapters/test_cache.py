"""Eviction stories of AdapterCache with K=2 device slots and a host budget of exactly 3 adapters:
LRU order, evict-before-load, host-tier eviction, hit/miss events, pinning, drop_owner; then a new
version uploaded mid-traffic through HTTP (no request that starts after the 201 is served v1)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.adapters.cache import AdapterCache, AdapterKey, SlotsBusy
from service.adapters.peft_format import read_adapter_dir
from service.adapters.slots import LoraSlots
from service.adapters.store import AdapterStore
from tests.conftest import app_state, bearer, builtin_engine, create_user, running_app
from tests.factories import ALL, greedy, lora_zip, make_lora, peft_files, upload
from tests.models import load_base, tiny_model

MAX_SCALE = 256.0  # the default OPPU_ADAPTER_MAX_SCALE

TARGETS = ("q_proj", "v_proj", "down_proj")
OWNERS = ("aa", "bb", "cc", "dd")


@dataclass
class Adapters:
    store: AdapterStore
    keys: dict[str, AdapterKey]  # owner -> its v1 key; "aa2" -> owner aa's v2
    nbytes: int


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    root = tmp_path_factory.mktemp("cache")
    base, store = tiny_model(), AdapterStore(root / "store")
    keys: dict[str, AdapterKey] = {}
    specs = [(owner, 1, owner) for owner in OWNERS] + [("aa", 2, "aa2")]
    for seed, (owner, version, name) in enumerate(specs):
        d = make_lora(base, root / name, seed=seed, r=4, targets=TARGETS)
        store.publish(owner, version, peft_files(d))
        keys[name] = AdapterKey(owner, version, store.sha256(owner, version), store.version_dir(owner, version))
    sizes = {
        read_adapter_dir(max_scale=MAX_SCALE, directory=store.version_dir(k.owner_key, k.version)).nbytes()
        for k in keys.values()
    }
    assert len(sizes) == 1  # same rank and modules: the budget below fits exactly 3
    return Adapters(store, keys, sizes.pop())


@dataclass
class Cache:
    cache: AdapterCache
    slots: LoraSlots
    events: list[tuple[str, str]] = field(default_factory=list)

    def take_events(self) -> list[tuple[str, str]]:
        out, self.events[:] = list(self.events), []
        return out


@pytest.fixture
def cache(adapters: Adapters) -> Cache:
    slots = LoraSlots(tiny_model(), 2, 8, ALL, device="cpu", dtype=torch.float32)
    events: list[tuple[str, str]] = []
    c = AdapterCache(slots, host_budget_bytes=3 * adapters.nbytes, on_event=lambda e, t, _s: events.append((e, t)))
    return Cache(c, slots, events)


def use(c: Cache, key: AdapterKey) -> int:
    """One batch of one row: acquire then release."""
    (slot,) = c.cache.acquire([key])
    c.cache.release([key])
    return slot


def stall_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """cache.py's disk reads stall after reading: `reading` is set then, and each waits for `go`."""
    import service.adapters.cache as cache_module

    reading, go = threading.Event(), threading.Event()

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        out = read_adapter_dir(*args, **kwargs)
        reading.set()
        go.wait(10)
        return out

    monkeypatch.setattr(cache_module, "read_adapter_dir", slow_read)  # the name cache.py calls
    return reading, go


def assert_slot_holds(c: Cache, slot: int, key: AdapterKey, store: AdapterStore) -> None:
    weights = read_adapter_dir(max_scale=MAX_SCALE, directory=store.version_dir(key.owner_key, key.version))
    for path, m in weights.modules.items():
        layer = c.slots.layers[path]
        torch.testing.assert_close(layer.A_slots[slot, :, : m.rank], m.a.t())
        torch.testing.assert_close(layer.B_slots[slot, : m.rank], m.b.t() * m.scaling)
        assert not layer.A_slots[slot, :, m.rank :].any()
    assert len(weights.modules) == 6 and not c.slots.layers["model.layers.0.self_attn.k_proj"].A_slots[slot].any()


def test_hit_miss_events_and_slot_lru_evicts_before_load(cache: Cache, adapters: Adapters) -> None:
    a, b, c = (adapters.keys[o] for o in ("aa", "bb", "cc"))
    slot_a = use(cache, a)
    assert cache.take_events() == [("miss", "slot"), ("miss", "host"), ("load", "host"), ("load", "slot")]
    assert use(cache, a) == slot_a
    assert cache.take_events() == [("hit", "slot")]
    slot_b = use(cache, b)
    assert slot_b != slot_a and {slot_a, slot_b} == {1, 2}
    use(cache, a)  # a hit re-orders: b is now the least recently used
    cache.take_events()
    assert list(cache.cache.slot_keys()) == [b, a]
    assert use(cache, c) == slot_b  # b's slot, freed by evicting b BEFORE c is loaded into it
    assert cache.take_events() == [
        ("miss", "slot"),
        ("miss", "host"),  # read before the cache lock is taken (see the deadlock test below)
        ("load", "host"),
        ("evict", "slot"),
        ("load", "slot"),
    ]
    assert cache.cache.slot_keys() == {a: slot_a, c: slot_b}
    assert_slot_holds(cache, slot_b, c, adapters.store)
    assert_slot_holds(cache, slot_a, a, adapters.store)
    # b left the slot tier but not host RAM: reloading it is a host hit (a tensor copy, no disk read).
    use(cache, b)
    assert cache.take_events() == [("miss", "slot"), ("hit", "host"), ("evict", "slot"), ("load", "slot")]
    assert list(cache.cache.slot_keys()) == [c, b]


def test_host_tier_lru_within_budget(cache: Cache, adapters: Adapters) -> None:
    a, b, c, d = (adapters.keys[o] for o in OWNERS)
    for key in (a, b, c):
        cache.cache.prefetch(key)
    assert cache.cache.host_keys() == [a, b, c] and cache.cache.host_bytes == 3 * adapters.nbytes
    assert cache.take_events() == [("miss", "host"), ("load", "host")] * 3
    cache.cache.host_weights(a)  # a hit moves a to the young end
    assert cache.take_events() == [("hit", "host")]
    cache.cache.prefetch(d)  # the budget holds 3: b (least recent) goes, before d is admitted
    assert cache.cache.host_keys() == [c, a, d] and cache.cache.host_bytes == 3 * adapters.nbytes
    # (the disk read happens outside the lock, so its "load" may come before the "evict")
    assert sorted(cache.take_events()) == [("evict", "host"), ("load", "host"), ("miss", "host")]
    assert cache.cache.slot_keys() == {}  # prefetch never touches device slots
    cache.cache.prefetch(d)
    assert cache.take_events() == []  # already in host RAM: nothing happens


def test_pinned_adapters_are_never_evicted(cache: Cache, adapters: Adapters) -> None:
    a, b, c = (adapters.keys[o] for o in ("aa", "bb", "cc"))
    slots = cache.cache.acquire([a, None, a]) + cache.cache.acquire([b])  # two in-flight batches
    assert slots[1] == 0 and slots[0] == slots[2] and slots[3] not in (0, slots[0])
    assert cache.cache.pinned() == {a: 2, b: 1}
    with pytest.raises(RuntimeError, match="pinned"):
        cache.cache.acquire([c])  # K=2 and both pinned: refused, nothing evicted
    assert cache.cache.slot_keys() == {a: slots[0], b: slots[3]}
    assert cache.cache.pinned() == {a: 2, b: 1}
    cache.cache.release([a, None, a])
    assert cache.cache.acquire([c]) == [slots[0]]  # a was released: its slot is reused, b's is not
    assert cache.cache.slot_keys() == {b: slots[3], c: slots[0]}
    assert_slot_holds(cache, slots[3], b, adapters.store)
    cache.cache.release([b])
    cache.cache.release([c])
    assert cache.cache.pinned() == {}


def test_failed_acquire_pins_nothing(cache: Cache, adapters: Adapters) -> None:
    """A batch whose acquire fails (an adapter file vanished) must not leave earlier rows pinned."""
    a = adapters.keys["aa"]
    gone = AdapterKey("zz", 1, "0" * 64, adapters.store.version_dir("zz", 1))
    with pytest.raises(FileNotFoundError):
        cache.cache.acquire([a, gone])
    assert cache.cache.pinned() == {}
    b, c = adapters.keys["bb"], adapters.keys["cc"]
    use(cache, b)
    use(cache, c)  # both slots can still be used: nothing was left pinned
    assert set(cache.cache.slot_keys()) == {b, c}


def test_drop_owner(cache: Cache, adapters: Adapters) -> None:
    a1, a2, b = adapters.keys["aa"], adapters.keys["aa2"], adapters.keys["bb"]
    use(cache, a1)
    use(cache, b)
    cache.cache.prefetch(a2)
    cache.cache.drop_owner("aa", keep=a2)  # a new version: the older one goes from both tiers
    assert set(cache.cache.slot_keys()) == {b} and cache.cache.host_keys() == [b, a2]
    assert cache.cache.host_bytes == 2 * adapters.nbytes
    (slot,) = cache.cache.acquire([a2])  # pinned by an in-flight batch when the owner is deleted
    cache.cache.drop_owner("aa")
    assert cache.cache.host_keys() == [b]
    assert cache.cache.slot_keys() == {b: cache.cache.slot_keys()[b], a2: slot}  # still in use: kept
    cache.cache.release([a2])  # its last row ends: the dropped entry goes with it (no second drop needed)
    assert set(cache.cache.slot_keys()) == {b}
    assert cache.cache.pinned() == {}


def test_a_disk_read_in_flight_when_its_owner_is_dropped_is_not_kept(
    cache: Cache, adapters: Adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request's prefetch reading the adapter when the erase's notice drops the owner: the weights it read
    # went into host RAM after the drop and stayed there (nothing asks for that owner again).
    import service.adapters.cache as cache_module

    a = adapters.keys["aa"]
    reading, go = stall_reads(monkeypatch)
    request = threading.Thread(target=cache.cache.prefetch, args=(a,))
    request.start()
    assert reading.wait(10)
    cache.cache.drop_owner("aa")
    go.set()
    request.join(10)
    assert cache.cache.host_keys() == []
    monkeypatch.setattr(cache_module, "read_adapter_dir", read_adapter_dir)
    cache.cache.prefetch(a)  # a read that starts after the drop is kept as before
    assert cache.cache.host_keys() == [a]


def test_a_slot_load_whose_read_overlapped_its_owners_drop_is_not_kept(
    cache: Cache, adapters: Adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine thread reading an adapter for a batch when the erase's notice drops the owner: host RAM did not
    # keep the weights, but the slot did, after the batch released it (an erased user's weights resident until
    # LRU evicted them).
    import service.adapters.cache as cache_module

    a, b = adapters.keys["aa"], adapters.keys["bb"]
    reading, go = stall_reads(monkeypatch)
    slots: list[int] = []
    batch = threading.Thread(target=lambda: slots.extend(cache.cache.acquire([a])))
    batch.start()
    assert reading.wait(10)
    cache.cache.drop_owner("aa")
    go.set()
    batch.join(10)
    assert slots and slots[0] != 0 and cache.cache.pinned() == {a: 1}  # the batch still runs on what it read
    cache.cache.release([a])
    assert cache.cache.slot_keys() == {} and cache.cache.host_keys() == []
    monkeypatch.setattr(cache_module, "read_adapter_dir", read_adapter_dir)
    use(cache, b)  # other owners and later reads are kept as before
    use(cache, a)
    assert set(cache.cache.slot_keys()) == {a, b}


# --- a version change mid-traffic, through HTTP (K=2, host budget of 3 adapters, 4 adapters in use) ---
@dataclass
class Answer:
    user: str
    started: float
    status: int
    version: int | None
    text: str


@pytest.fixture
def busy_app(tmp_path: Path, tiny_model_path: Path, db_url: str) -> Iterator[tuple[TestClient, dict[str, Path]]]:
    base = load_base(tiny_model_path)
    names = ("v1", "v2", "u1", "u2", "u3")
    loras = {n: make_lora(base, tmp_path / n, seed=i, r=4, targets=("q_proj", "v_proj")) for i, n in enumerate(names)}
    nbytes = read_adapter_dir(max_scale=MAX_SCALE, directory=loras["v1"]).nbytes()
    overrides: dict[str, Any] = {"adapter_slots": 2, "adapter_host_budget_bytes": 3 * nbytes, "batch_max_size": 4}
    with running_app(tmp_path, tiny_model_path, db_url, **overrides) as client:
        yield client, loras


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_version_change_mid_traffic(
    busy_app: tuple[TestClient, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, loras = busy_app
    keys = {u: create_user(client, u) for u in ("u0", "u1", "u2", "u3")}
    for user, lora in (("u0", "v1"), ("u1", "u1"), ("u2", "u2"), ("u3", "u3")):
        assert upload(client, user, keys[user], lora_zip(loras[lora])).status_code == 201

    state, cache = app_state(client), builtin_engine(client).cache
    events: list[tuple[str, str]] = []
    original = cache._on_event

    def record(event: str, tier: str, seconds: float) -> None:  # wraps the app's own hook (metrics)
        events.append((event, tier))
        if original is not None:
            original(event, tier, seconds)

    monkeypatch.setattr(cache, "_on_event", record)
    answers: list[Answer] = []
    stop = threading.Event()
    uploaded_at: list[float] = []

    def worker(w: int) -> None:
        n = 0
        while not stop.is_set():
            user = "u0" if n % 2 == 0 else f"u{1 + (w + n) % 3}"
            n += 1
            started = time.monotonic()
            r = client.post(f"/users/{user}/generate", json=greedy("Tell me a story.", 4), headers=bearer(keys[user]))
            body = r.json()
            answers.append(Answer(user, started, r.status_code, body.get("adapter_version"), body.get("text", "")))

    def after_upload() -> list[Answer]:
        return [a for a in answers if a.user == "u0" and uploaded_at and a.started > uploaded_at[0]]

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(worker, w) for w in range(6)]
        try:
            deadline = time.monotonic() + 60
            while len(answers) < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = upload(client, "u0", keys["u0"], lora_zip(loras["v2"]))
            uploaded_at.append(time.monotonic())
            assert r.status_code == 201 and r.json()["version"] == 2, r.text
            while len(after_upload()) < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            for f in futures:
                f.result()
    assert [a for a in answers if a.status != 200] == []
    late = after_upload()
    assert len(late) >= 12
    assert {a.version for a in late} == {2}, [(a.version, a.started - uploaded_at[0]) for a in late]
    assert {a.version for a in answers if a.user == "u0"} == {1, 2}
    assert all(a.version == 1 for a in answers if a.user != "u0")
    # The label is not all: every answer's text is that version's greedy text (no stale weights).
    texts = {v: {a.text for a in answers if a.user == "u0" and a.version == v} for v in (1, 2)}
    assert len(texts[1]) == 1 and len(texts[2]) == 1 and texts[1] != texts[2], texts
    assert cache.pinned() == {} and len(cache.slot_keys()) <= 2
    assert ("evict", "slot") in events  # 5 adapters (u0 v1, v2, u1..u3) took turns in 2 slots
    assert cache.host_bytes <= state.settings.adapter_host_budget_bytes


def test_requests_that_miss_the_same_adapter_together_read_it_once(
    cache: Cache, adapters: Adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-key single flight: 6 cold prefetches of one adapter at once make one disk read, not six."""
    import service.adapters.cache as cache_module

    reads: list[Path] = []

    def slow_read(directory: Path, **kw: Any) -> Any:
        reads.append(directory)
        time.sleep(0.2)  # the others arrive while the first read runs
        return read_adapter_dir(directory, **kw)

    monkeypatch.setattr(cache_module, "read_adapter_dir", slow_read)  # the name cache.py calls
    key = adapters.keys["aa"]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: cache.cache.prefetch(key), range(6)))
    assert len(reads) == 1
    assert cache.cache.host_keys() == [key]


def test_the_engine_taking_a_slot_while_a_request_reads_the_same_adapter_does_not_deadlock(
    adapters: Adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter larger than the host budget is read from disk each time it is not in a slot. A request
    thread's prefetch held the key's load lock and needed the cache lock to finish; the engine thread's acquire
    held the cache lock and waited for that load lock: both hung (and with them every request)."""
    import service.adapters.cache as cache_module

    def slow_read(directory: Path, **kw: Any) -> Any:
        time.sleep(0.3)  # the engine thread arrives while this read runs
        return read_adapter_dir(directory, **kw)

    monkeypatch.setattr(cache_module, "read_adapter_dir", slow_read)  # the name cache.py calls
    slots = LoraSlots(tiny_model(), 2, 8, ALL, device="cpu", dtype=torch.float32)
    small = AdapterCache(slots, host_budget_bytes=adapters.nbytes // 2)  # nothing fits in host RAM
    key = adapters.keys["aa"]
    request = threading.Thread(target=small.prefetch, args=(key,), daemon=True)
    request.start()
    time.sleep(0.1)
    got: list[list[int]] = []
    engine = threading.Thread(target=lambda: got.append(small.acquire([key])), daemon=True)
    engine.start()
    request.join(10)
    engine.join(10)
    assert not request.is_alive() and not engine.is_alive(), "deadlock"
    assert got == [[1]] and small.pinned() == {key: 1}


def test_a_row_waiting_for_a_slot_does_not_read_its_adapter_again_each_step(
    cache: Cache, adapters: Adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.adapters.cache as cache_module

    a, b, c = (adapters.keys[o] for o in ("aa", "bb", "cc"))
    cache.cache.acquire([a, b])  # both slots pinned by running rows
    reads: list[Path] = []
    monkeypatch.setattr(cache_module, "read_adapter_dir", lambda d, **kw: reads.append(d))
    for _ in range(3):
        with pytest.raises(SlotsBusy):
            cache.cache.acquire([c])
    assert reads == []


@pytest.mark.parametrize("failure", ["erased", "damaged"])
def test_a_prefetch_keeps_a_service_error_and_wraps_the_rest(
    cache: Cache, adapters: Adapters, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The owner erased while a request read their adapter (their data key destroyed): 410 user_data_erased as
    the README says, not 503 "retry later" (a retry can never succeed); damaged files stay 503."""
    import service.adapters.cache as cache_module
    from service.errors import AdapterUnavailable
    from service.sealing.service import UserDataErased

    def failing_read(*args: Any, **kwargs: Any) -> Any:
        raise UserDataErased("gone") if failure == "erased" else ValueError("bad header")

    monkeypatch.setattr(cache_module, "read_adapter_dir", failing_read)
    expected = UserDataErased if failure == "erased" else AdapterUnavailable
    with pytest.raises(expected):
        cache.cache.prefetch(adapters.keys["aa"])
