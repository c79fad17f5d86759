"""The engine boundary and the ONE request side every engine shares.

`Engine` is what the request path sees: ONE object schedules rows, owns the model weights, the KV memory and
the adapter slots, streams tokens and can cancel rows. Nothing above it knows which engine runs
(`OPPU_ENGINE=builtin|vllm`); the request path (`generation.service`) is its only caller.

`EngineFront` is the request side both engines inherit, so that it exists once: the prompt-fits rule
(`check_fits`, also called by the preparation step before a stream's first byte), admission through the
per-tenant fair queue (429/503) with a fair share of the running rows, the event pump between the engine
thread and the requester's event loop, the deadline/cancel rule (504, client gone, tenant cancelled), the
engine thread's loop and shutdown. An engine keeps only what differs: how a row is built and started
(`_new_row`, `_start`), one step (`_step`), and how a row's resources are freed (`_release`).
Knows no users, SQL or HTTP; rows carry plain data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from service.batching.fair_queue import FairQueue, QueueFull, TenantQueueFull
from service.engine.types import AdapterRef, EngineEvent, EngineRequest, EngineStats, Finished, TokenEvent
from service.errors import PromptTooLong, Timeout, TooManyRequests, Unavailable, Unprocessable
from service.inference.threads import release_pool
from service.threads import run_to_its_end

log = logging.getLogger(__name__)


class Engine(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def context_length(self) -> int:
        """The most tokens one row may hold (prompt + new tokens)."""
        ...

    @property
    def limits(self) -> EngineLimits: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        """Queue the row and yield its events, ending with one Finished. Raises a ServiceError: 422 when it
        cannot fit (`check_fits`), 429/503 when the tenant's share or the server is full, 503
        adapter_unavailable, 504 past the deadline, generation_failed for this row only. The engine applies
        the request's adapter and shared task LoRA itself. Closing the iterator early cancels the row."""
        ...

    def check_room(self, tenant: str, rows: int) -> None:
        """Raises now the 429/503 (with Retry-After) that queueing `rows` more rows of the tenant would raise:
        a stream checks before its response starts, so that overload is a plain JSON error. Changes nothing
        (`stream` still decides: a queue that fills a moment later is reported in-band)."""
        ...

    @property
    def on_reject(self) -> list[Callable[[str], None]]:
        """Hooks told the reason of each refusal (`queue_errors`): metrics."""
        ...

    def cancel_tenant(self, tenant: str, error: BaseException) -> int:
        """End every queued and running row of a tenant (its user was erased), and any row of it queued before
        this call that the engine is starting meanwhile: each requester hears `error`. Returns how many rows were
        cancelled at once (those seen in the queue or running)."""
        ...

    def use_shared(self, adapter: AdapterRef | None, read_at: float | None = None) -> None:
        """Warm the current shared task LoRA ahead of requests (start-up, a new version announced); rows run
        on the version their request names (`EngineRequest.shared`), or are refused (503) when another version
        is current by then. `read_at`: when the caller read `adapter` (time.monotonic(), before the read; None:
        now): an older read than the engine's newest changes nothing."""
        ...

    def drop_owner(self, owner_key: str) -> None:
        """Forget an owner's cached adapter versions (deleted or superseded); pinned ones go when unpinned."""
        ...

    def stats(self) -> EngineStats: ...


# --- the one prompt-fits rule ---


@dataclass(frozen=True)
class EngineLimits:
    """What one row may hold: the context, and the longest scored continuation one step can run."""

    context_length: int
    max_continuation_tokens: int


def check_fits(request: EngineRequest, limits: EngineLimits) -> None:
    """422 prompt_too_long unless the prompt plus its new (or scored) tokens fit a row; the same rule and
    error for every engine and every route. An empty prompt (text that tokenizes to nothing, e.g. a control
    character) is 422 too: a row needs one token to predict from."""
    if not request.prompt_ids:
        raise Unprocessable("the prompt is empty once tokenized; send at least one token of text")
    conts = request.continuations
    if conts and (any(not c for c in conts) or max(map(len, conts)) > limits.max_continuation_tokens):
        raise PromptTooLong(
            f"each scored continuation must be 1..{limits.max_continuation_tokens} tokens",
            details={"max_continuation_tokens": limits.max_continuation_tokens},
        )
    more = request.sampling.max_new_tokens + sum(map(len, conts))
    if len(request.prompt_ids) + more > limits.context_length:
        raise PromptTooLong(
            f"prompt is {len(request.prompt_ids)} tokens; with {more} more (new or scored tokens) it exceeds "
            f"the model's context of {limits.context_length} tokens",
            details={"prompt_tokens": len(request.prompt_ids), "context_length": limits.context_length},
        )


# --- rows and their events ---


@dataclass(frozen=True)
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


@dataclass(eq=False)
class EngineRow:
    """What every engine's row has: its request, the sink to its requester, and the cancel flag with the
    error its requester hears (None: nobody is listening any more); `cancels_seen`: how many tenant cancels
    the engine had seen when the row was queued (a later cancel of its tenant ends it)."""

    request: EngineRequest
    sink: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event, kw_only=True)
    cancel_error: BaseException | None = field(default=None, kw_only=True)
    cancels_seen: int = field(default=0, kw_only=True)

    def cancel(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.cancel_error = error
        self.cancelled.set()


R = TypeVar("R", bound=EngineRow)
# What `_start` says of a row it was offered: it runs; it keeps its turn in the queue (e.g. no adapter slot);
# or it was dropped (the engine told its requester why).
Started = Literal["started", "keep", "dropped"]


@contextlib.contextmanager
def queue_errors(on_reject: Sequence[Callable[[str], None]] = ()) -> Iterator[None]:
    """The queue's refusals as the HTTP errors every engine answers (submit, check_room and the preparation
    step's gate: one rule); each refusal is reported to `on_reject` with its reason (per_user: 429,
    queue_full: 503)."""
    try:
        yield
    except TenantQueueFull as exc:
        for hook in on_reject:
            hook("per_user")
        raise TooManyRequests(str(exc), headers={"Retry-After": "1"}) from exc
    except QueueFull as exc:
        for hook in on_reject:
            hook("queue_full")
        raise Unavailable("the server is saturated; retry later", headers={"Retry-After": "1"}) from exc


# Consecutive failed steps after which an engine reports itself unhealthy, for UNHEALTHY_FOR_S after the last.
FAILED_STEPS_UNHEALTHY = 5
UNHEALTHY_FOR_S = 30.0


class EngineFront(Generic[R]):
    """The request side of every engine. Subclasses implement `limits`, `_new_row`, `_start`, `_step` and
    `_release`; they may override `_has_room` (default: fewer than `capacity` rows run) and `_tick`."""

    idle_wait_s = 0.1

    def __init__(self, *, capacity: int, queue_max: int, queue_per_tenant: int, fair_share: bool) -> None:
        self.capacity = capacity  # rows that may run at once
        self.fair_share = fair_share
        self._waiting: FairQueue[R] = FairQueue(queue_max, queue_per_tenant)
        self._running: list[R] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._steps = 0
        self.on_reject: list[Callable[[str], None]] = []  # the queue refused a request: its reason (metrics)
        self._failed_steps = 0  # consecutive steps that failed as a whole (see healthy)
        self._failed_at = 0.0  # time.monotonic() of the last one
        # cancel_tenant sees the queue and the running rows, not a row the engine thread holds between them (taken
        # for admission, inside _start): each cancel is numbered and kept per tenant, and the engine thread ends a
        # row queued before its tenant's latest cancel wherever it meets it. An entry goes once no such row is left.
        self._cancel_lock = threading.Lock()  # a row's number and its place in the queue, taken together
        self._cancels_seen = 0
        self._tenant_cancels: dict[str, tuple[int, BaseException]] = {}

    # --- what each engine supplies ---
    @property
    def limits(self) -> EngineLimits:
        raise NotImplementedError

    def _new_row(self, request: EngineRequest, sink: Callable[[object], None]) -> R:
        """The row for a request, built in a request thread (not the engine's): the place for the engine's
        own effects of admitting it (adapter prefetch, the shared task LoRA, a LoRA folder); may raise."""
        raise NotImplementedError

    def _has_room(self) -> bool:
        return len(self._running) < self.capacity

    def _start(self, row: R) -> Started:
        raise NotImplementedError

    def _step(self) -> bool:
        """One step of the running rows; False when there was nothing to run."""
        raise NotImplementedError

    def _release(self, row: R) -> bool:
        """Free what a running row holds (it leaves `_running`); False if it had left already."""
        raise NotImplementedError

    def _on_admission_round(self) -> None:
        """Called before each admission round (per-round state of `_start`)."""

    def _went_idle(self) -> None:
        """Called on the engine thread when it has just run out of work."""

    # --- the request side ---
    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        check_fits(request, self.limits)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        row = await run_to_its_end(self._prepared_row, request, event_sink(loop, events))
        self.submit(row)
        ended = False
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                assert isinstance(item, TokenEvent | Finished)
                ended = isinstance(item, Finished)
                yield item
                if ended:
                    return
        finally:
            if not ended:
                self.cancel(row)

    def _prepared_row(self, request: EngineRequest, sink: Callable[[object], None]) -> R:
        """`_new_row` on a request thread, which then gives back any OpenMP pool its adapter reads built."""
        try:
            return self._new_row(request, sink)
        finally:
            release_pool()

    def submit(self, row: R) -> None:
        """Queue a row (any thread): 429 when its tenant's queue share is used up, 503 when the server's is."""
        check_fits(row.request, self.limits)
        with self._cancel_lock, queue_errors(self.on_reject):
            row.cancels_seen = self._cancels_seen
            self._waiting.put(row.request.tenant, row)
        self._wake.set()

    def check_room(self, tenant: str, rows: int) -> None:
        with queue_errors(self.on_reject):
            self._waiting.check_room(tenant, rows)

    def cancel(self, row: R, error: BaseException | None = None) -> None:
        """The requester went away, or the row must end (any thread): dropped before the next step."""
        row.cancel(error)
        self._wake.set()

    def cancel_tenant(self, tenant: str, error: BaseException) -> int:
        with self._cancel_lock:  # first: a row this scan cannot see is ended by the engine thread (_cancelled)
            self._cancels_seen += 1
            self._tenant_cancels[tenant] = (self._cancels_seen, error)
        rows = [r for r in self._waiting.snapshot() + list(self._running) if r.request.tenant == tenant]
        for row in rows:
            row.cancel(error)
        self._wake.set()
        return len(rows)

    # --- the engine thread ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"oppu-{type(self).__name__}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Every running and every still-waiting row hears that the server is shutting down."""
        self._stopping.set()
        self._wake.set()
        self._waiting.close()
        if self._thread is not None:
            self._thread.join(timeout=30)
        gone = Unavailable("the server is shutting down")
        for row in list(self._running):
            row.sink(gone)
        while (left := self._waiting.get(timeout=0)) is not None:
            left[1].sink(gone)

    def _adapter_owners(self) -> tuple[frozenset[str], frozenset[str]]:
        """Owners of the adapters of the running rows and of the waiting rows."""
        running = frozenset(r.request.adapter.owner_key for r in list(self._running) if r.request.adapter)
        waiting = frozenset(r.request.adapter.owner_key for r in self._waiting.snapshot() if r.request.adapter)
        return running, waiting

    @property
    def healthy(self) -> bool:
        """The engine thread runs, and its last FAILED_STEPS_UNHEALTHY steps did not all fail within the last
        UNHEALTHY_FOR_S: a lasting fault (a dead accelerator, a broken model) makes /readyz say so instead of the
        replica answering every request with 503. After UNHEALTHY_FOR_S it says ready again, so that a balancer
        that stopped sending traffic sends some again: one good step clears the count (a half-open breaker)."""
        alive = self._thread is not None and self._thread.is_alive()
        recent = time.monotonic() - self._failed_at < UNHEALTHY_FOR_S
        return alive and not (self._failed_steps >= FAILED_STEPS_UNHEALTHY and recent)

    def _step_outcome(self, ok: bool) -> None:
        """A step ran (ok) or failed as a whole (its forward, or the loop's iteration)."""
        self._failed_steps = 0 if ok else self._failed_steps + 1
        if not ok:
            self._failed_at = time.monotonic()

    def _loop(self) -> None:
        busy = False
        while not self._stopping.is_set():
            try:
                if self._tick():
                    busy = True
                    continue
                if busy:
                    self._went_idle()
                    busy = False
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
            except Exception:  # the loop itself must survive anything a step throws
                log.exception("engine iteration failed")
                self._step_outcome(False)

    def _tick(self) -> bool:
        self._reap()
        self._admit()
        return self._step()

    def _end(self, row: R, error: BaseException | None) -> None:
        """A running row ends early: its resources are freed BEFORE its requester hears `error`."""
        if self._release(row) and error is not None:
            row.sink(error)

    def _reap(self) -> None:
        """The one deadline/cancel rule: cancelled rows end with their cancel error (quietly when the client
        left), rows past their deadline with 504, running or still waiting."""
        now = time.monotonic()
        expired = Timeout("generation passed its deadline")
        for row in list(self._running):
            if self._cancelled(row):
                self._end(row, row.cancel_error)
            elif now > row.request.deadline:
                self._end(row, expired)
        for _, row in self._waiting.remove_if(lambda r: self._cancelled(r) or now > r.request.deadline):
            error = row.cancel_error if row.cancelled.is_set() else expired
            if error is not None:
                row.sink(error)
        if self._tenant_cancels:
            self._forget_cancels()

    def _cancelled(self, row: R) -> bool:
        """The row's cancel flag, set now if its tenant was cancelled after the row was queued."""
        latest = self._tenant_cancels.get(row.request.tenant)
        if latest is not None and latest[0] > row.cancels_seen:
            row.cancel(latest[1])
        return row.cancelled.is_set()

    def _forget_cancels(self) -> None:
        """Drop the tenant cancels no row is older than. On the engine thread between admission rounds, so that
        every row queued so far is in the queue, running or gone; under the lock, so none is being queued."""
        with self._cancel_lock:
            rows = self._waiting.snapshot() + list(self._running)
            oldest = min((r.cancels_seen for r in rows), default=self._cancels_seen)
            for tenant in [t for t, (n, _) in self._tenant_cancels.items() if n <= oldest]:
                del self._tenant_cancels[tenant]

    def _share(self, running: Counter[str], waiting: set[str]) -> int:
        """Each active tenant's fair share of the running rows (a lone tenant gets every row)."""
        active = len(set(running) | waiting)
        return max(1, self.capacity // max(1, active))

    def _admit(self) -> None:
        """Waiting rows join while there is room, round-robin over tenants. With fair_share, while other
        tenants wait or run, a tenant at its share (`capacity / active tenants`) keeps its turn and the next
        tenant's row goes first; its rows still fill room that no other row can use (work-conserving).
        Running rows are never preempted. Rows `_start` keeps (no adapter slot yet) keep their turn."""
        self._on_admission_round()
        running: Counter[str] = Counter(r.request.tenant for r in self._running)
        kept: list[tuple[Hashable, R]] = []  # back to the front of the queue, in the order taken
        over: list[tuple[Hashable, R]] = []  # rows of tenants at their share, in the order taken
        waiting = {r.request.tenant for r in self._waiting.snapshot()} if self.fair_share else set()
        while self._has_room():
            got = self._waiting.get(timeout=0)
            if got is None:
                break
            if self.fair_share and running[got[1].request.tenant] >= self._share(running, waiting):
                over.append(got)
                continue
            if self._offer(got, running):
                kept.append(got)
        if not kept:  # nobody else can use the room: rows over their share may take it
            for i, got in enumerate(over):
                if not self._has_room():
                    kept.extend(over[i:])
                    break
                if self._offer(got, running):
                    kept.append(got)
        else:
            kept.extend(over)
        if kept:
            self._waiting.put_back(kept)

    def _offer(self, got: tuple[Hashable, R], running: Counter[str]) -> bool:
        """Try to start a taken row; True when it must go back to the queue."""
        row = got[1]
        if self._cancelled(row):
            if row.cancel_error is not None:
                row.sink(row.cancel_error)
            return False
        verdict = self._start(row)
        if verdict == "started":
            self._running.append(row)
            if self._cancelled(row):  # while it started (an adapter read from disk): cancel_tenant missed it
                self._end(row, row.cancel_error)
                return False
            running[row.request.tenant] += 1
        return verdict == "keep"
