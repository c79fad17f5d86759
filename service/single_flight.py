"""One computation at a time for callers that may share its result: a caller arriving while it runs awaits
that run instead of starting its own. For the probe routes (`/readyz`, `/metrics`): they need no key and count
in no request cap (a saturated replica must still answer them), so without this a flood of them took a worker
thread and a database connection each, from every tenant's pool. Knows nothing of HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from service.threads import run_to_its_end

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """`compute` in one worker thread at a time, its result (or error) given to every caller that awaited it.
    A caller that leaves does not cancel the run the others await. One event loop per instance."""

    def __init__(self) -> None:
        self._running: asyncio.Future[T] | None = None

    async def run(self, compute: Callable[[], T]) -> T:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(run_to_its_end(compute))
        return await asyncio.shield(self._running)
