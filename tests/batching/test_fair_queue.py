from __future__ import annotations

import threading

import pytest

from service.batching.fair_queue import FairQueue, QueueFull, TenantQueueFull


def test_round_robin_and_caps() -> None:
    q: FairQueue[str] = FairQueue(max_total=6, max_per_tenant=3)
    for i in range(3):
        q.put("a", f"a{i}")
    with pytest.raises(TenantQueueFull):
        q.put("a", "a3")
    q.put("b", "b0")
    q.put("c", "c0")
    q.put("b", "b1")
    with pytest.raises(QueueFull) as full:
        q.put("d", "d0")
    assert not isinstance(full.value, TenantQueueFull)
    order = [q.get(timeout=0)[1] for _ in range(6)]  # type: ignore[index]
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert q.get(timeout=0) is None


def test_put_back_goes_first_and_get_blocks_until_put() -> None:
    q: FairQueue[str] = FairQueue(max_total=2, max_per_tenant=2)
    q.put("a", "a1")
    q.put_back([("b", "b0"), ("a", "a0")])  # admitted earlier: ignores caps, goes to the front
    assert [q.get(timeout=0)[1] for _ in range(3)] == ["b0", "a0", "a1"]  # type: ignore[index]
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    t.start()
    q.put("z", "z0")
    t.join(2)
    assert got == [("z", "z0")]
    q.close()
    assert q.get(timeout=None) is None


def test_put_back_keeps_its_turn_when_its_tenant_sent_a_newer_item_meanwhile() -> None:
    """The engine takes every waiting row each step and puts back the ones whose adapter found no slot. A new
    request of the same user arriving in between must not send the old one to the back of the line: that
    starved rows for seconds under 64 clients (tenant collisions are frequent)."""
    q: FairQueue[str] = FairQueue(max_total=8, max_per_tenant=4)
    q.put("t", "t-old")
    q.put("u", "u0")
    taken = [q.get(timeout=0), q.get(timeout=0)]  # the engine takes both; neither fits
    q.put("v", "v0")  # arrivals while they were out
    q.put("t", "t-new")
    q.put_back([item for item in taken if item is not None])
    order = [q.get(timeout=0)[1] for _ in range(4)]  # type: ignore[index]
    assert order == ["t-old", "u0", "v0", "t-new"]


def test_check_room_raises_what_put_would_and_changes_nothing() -> None:
    q: FairQueue[str] = FairQueue(max_total=3, max_per_tenant=2)
    q.check_room("a", 2)
    with pytest.raises(TenantQueueFull):
        q.check_room("a", 3)  # n rows of one request count together
    q.put("a", "a1")
    q.put("a", "a2")
    with pytest.raises(TenantQueueFull):
        q.check_room("a", 1)
    q.check_room("b", 1)
    with pytest.raises(QueueFull) as info:
        q.check_room("b", 2)
    assert not isinstance(info.value, TenantQueueFull)  # the server's share: 503, not the user's 429
    assert len(q) == 2


def test_remove_if_asks_once_per_item_so_a_cancel_in_between_is_not_counted_twice() -> None:
    """The reaper's predicate reads flags that requester threads set at any time: an item must be either kept
    or removed, and the size must stay the real count (a negative size stopped the engine's loop)."""
    queue: FairQueue[list[bool]] = FairQueue(10, 10)
    row = [False]
    queue.put("a", row)

    def cancelled_meanwhile(item: list[bool]) -> bool:
        verdict = item[0]
        item[0] = True  # another thread cancels right after this look
        return verdict

    removed = queue.remove_if(cancelled_meanwhile)
    assert removed == [] and queue.snapshot() == [row] and len(queue) == 1
    assert queue.remove_if(lambda item: item[0]) == [("a", row)]
    assert len(queue) == 0 and queue.get(timeout=0) is None
