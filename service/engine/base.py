"""The engine boundary: ONE object schedules rows, owns the model weights, the KV memory and the adapter
slots, streams tokens and can cancel a row. Nothing above it knows which engine runs
(`OPPU_ENGINE=builtin|vllm`); the request path (`generation.prepare`) is its only caller.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from service.batching.fair_queue import FairQueue
from service.engine.types import AdapterRef, EngineEvent, EngineRequest, EngineStats, Finished, TokenEvent
from service.errors import Timeout, Unavailable


class Engine(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def context_length(self) -> int:
        """The most tokens one row may hold (prompt + new tokens)."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Queue the row and yield its events, ending with one Finished. Raises a ServiceError: 429/503 when
        the tenant's share or the server is full, 503 adapter_unavailable, 504 past the deadline, 500-free
        generation_failed for this row only. Closing the iterator early cancels the row."""
        ...

    def prefetch(self, adapter: AdapterRef) -> None:
        """Warm the adapter from a request thread (AdapterUnavailable if it cannot be read)."""
        ...

    def use_shared(self, adapter: AdapterRef | None) -> None:
        """The current shared task LoRA (None: none). Applied before any row prepared after this call runs;
        rows already running finish on the weights they started with."""
        ...

    @property
    def shared_version(self) -> int | None:
        """The shared version rows will run on once pending changes are applied."""
        ...

    def drop_owner(self, owner_key: str) -> None:
        """Forget an owner's cached adapter versions (deleted or superseded); pinned ones go when unpinned."""
        ...

    def stats(self) -> EngineStats: ...


@dataclass
class Collected:
    tokens: list[TokenEvent]
    finished: Finished

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]


async def collect(engine: Engine, request: EngineRequest) -> Collected:
    """Run one row to its end and keep every event."""
    tokens: list[TokenEvent] = []
    async for event in engine.stream(request):
        if isinstance(event, Finished):
            return Collected(tokens, event)
        tokens.append(event)
    raise RuntimeError("engine stream ended without a Finished event")


def event_sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[object]) -> Callable[[object], None]:
    """Delivers engine-thread events to one request's event loop (dropped once that loop is gone)."""

    def put(item: object) -> None:
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    return put


class QueuedRow(Protocol):
    """What an engine's row offers the reaper: its request (deadline), cancel flag and event sink."""

    @property
    def request(self) -> EngineRequest: ...
    @property
    def cancelled(self) -> threading.Event: ...
    @property
    def sink(self) -> Callable[[object], None]: ...


R = TypeVar("R", bound=QueuedRow)


def reap(running: Sequence[R], waiting: FairQueue[R], end: Callable[[R, BaseException | None], None]) -> None:
    """The one deadline/cancel rule of every engine: cancelled rows end quietly, rows past their deadline end
    with 504, running (through the engine's `end`, which frees what they hold) or still waiting."""
    now = time.monotonic()
    expired = Timeout("generation passed its deadline")
    for row in list(running):
        if row.cancelled.is_set():
            end(row, None)
        elif now > row.request.deadline:
            end(row, expired)
    for _, row in waiting.remove_if(lambda r: r.cancelled.is_set() or now > r.request.deadline):
        if not row.cancelled.is_set():
            row.sink(expired)


def fail_all(running: Sequence[R], waiting: FairQueue[R]) -> None:
    """Engine stop: every running and every still-waiting row hears that the server is shutting down
    (call after the engine thread has stopped and the queue is closed)."""
    gone = Unavailable("the server is shutting down")
    for row in running:
        row.sink(gone)
    while (left := waiting.get(timeout=0)) is not None:
        left[1].sink(gone)
