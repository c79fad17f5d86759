"""A bounded queue of generate jobs, one FIFO per tenant, served round-robin: one user's burst cannot
starve the others (their first request is at most one round away), and each tenant has its own cap."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """The whole server is saturated (-> 503)."""


class TenantQueueFull(QueueFull):
    """This tenant already has its fair share queued (-> 429)."""


class FairQueue(Generic[T]):
    def __init__(self, max_total: int, max_per_tenant: int) -> None:
        self.max_total = max_total
        self.max_per_tenant = max_per_tenant
        self._queues: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._size = 0
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return self._size

    def put(self, tenant: Hashable, item: T) -> None:
        with self._cond:
            if self._size >= self.max_total:
                raise QueueFull("generation queue is full")
            mine = self._queues.get(tenant)
            if mine is not None and len(mine) >= self.max_per_tenant:
                raise TenantQueueFull("too many queued requests for this user")
            self._queues.setdefault(tenant, deque()).append(item)
            self._size += 1
            self._cond.notify()

    def check_room(self, tenant: Hashable, items: int) -> None:
        """Raises what `put` of `items` more items of the tenant would raise now; changes nothing (a put a
        moment later may still find the queue full)."""
        with self._cond:
            if self._size + items > self.max_total:
                raise QueueFull("generation queue is full")
            mine = self._queues.get(tenant)
            if (len(mine) if mine is not None else 0) + items > self.max_per_tenant:
                raise TenantQueueFull("too many queued requests for this user")

    def put_back(self, items: Iterable[tuple[Hashable, T]]) -> None:
        """Return items taken but not run (their adapter did not fit) to the FRONT of the queue, in the order
        they were taken, ignoring the caps: they were admitted already. Their tenants move to the front even
        when a newer item of theirs arrived meanwhile (which put the tenant at the back): otherwise every
        new request of the same user would send the old one to the end of the line again (starvation)."""
        with self._cond:
            for tenant, item in reversed(list(items)):
                q = self._queues.get(tenant)
                if q is None:
                    q = self._queues[tenant] = deque()
                self._queues.move_to_end(tenant, last=False)
                q.appendleft(item)
                self._size += 1
            self._cond.notify()

    def get(self, timeout: float | None) -> tuple[Hashable, T] | None:
        """The next item round-robin over tenants; None on timeout or once closed and empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._size == 0:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            tenant, q = next(iter(self._queues.items()))
            item = q.popleft()
            self._size -= 1
            if q:
                self._queues.move_to_end(tenant)  # next tenant's turn
            else:
                del self._queues[tenant]
            return tenant, item

    def remove_if(self, predicate: Callable[[T], bool]) -> list[tuple[Hashable, T]]:
        """Take out every queued item the predicate selects (cancelled, expired); returns them."""
        removed: list[tuple[Hashable, T]] = []
        with self._cond:
            for tenant in list(self._queues):
                keep: deque[T] = deque()
                # One verdict per item: the predicate reads state other threads change (a requester cancelling
                # its row), and asking twice could both keep an item and count it removed.
                for item in self._queues[tenant]:
                    if predicate(item):
                        removed.append((tenant, item))
                    else:
                        keep.append(item)
                if keep:
                    self._queues[tenant] = keep
                else:
                    del self._queues[tenant]
            self._size -= len(removed)
        return removed

    def snapshot(self) -> list[T]:
        """Every queued item (a copy, in no particular order)."""
        with self._cond:
            return [item for q in self._queues.values() for item in q]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
