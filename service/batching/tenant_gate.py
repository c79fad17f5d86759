"""Per-tenant admission to work that holds a worker thread and a pooled database connection: the preparation
step of generating requests (SQL, retrieval, tokenizing) and history writes.

A user's requests can all wait on one thing of theirs (a cold history index being built, the database's write
lock): a burst of one user would take the pool and the threads, and every other user's request would wait for
a connection (or get 503 `database_busy`). Here at most `active` requests of a tenant are inside at once; more
wait their turn on the event loop, holding neither, and a tenant with `most` requests at the gate already is
refused at once (`TenantQueueFull`: 429). The caller holds its place until its work has really ended (a thread
cannot be cancelled: service.threads).

Runs on one event loop (the process's); knows no users, SQL or HTTP: tenants are plain keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from service.batching.fair_queue import TenantQueueFull


@dataclass
class _Tenant:
    turns: asyncio.Semaphore
    at_gate: int = field(default=0)  # being prepared + waiting their turn


class TenantGate:
    def __init__(self, active: int, most: int, what: str = "requests of this user are being prepared") -> None:
        if active < 1:
            raise ValueError("active must be at least 1")
        self.active = active
        self.most = most
        self.what = what  # the refusal says "too many <what>"
        self._tenants: dict[Hashable, _Tenant] = {}

    def at_gate(self, tenant: Hashable) -> int:
        entry = self._tenants.get(tenant)
        return entry.at_gate if entry is not None else 0

    @asynccontextmanager
    async def admit(self, tenant: Hashable) -> AsyncIterator[None]:
        """The body runs as one of the tenant's `active` preparations; raises `TenantQueueFull` (before
        waiting) when the tenant already has `most` requests here. Entries go with their last request, so
        the gate holds nothing for tenants that are not being served."""
        entry = self._tenants.get(tenant)
        if entry is None:
            entry = self._tenants[tenant] = _Tenant(asyncio.Semaphore(self.active))
        if entry.at_gate >= self.most:
            raise TenantQueueFull(f"too many {self.what}")
        entry.at_gate += 1
        try:
            async with entry.turns:
                yield
        finally:
            entry.at_gate -= 1
            if entry.at_gate == 0:
                del self._tenants[tenant]
