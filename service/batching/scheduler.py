"""Collects generate requests from the event loop and runs them as mixed batches in one worker thread.

The thread owns every forward pass (the model is never touched concurrently). Each row keeps its own
sampling params and adapter; rows whose adapters do not fit in the free slots wait for the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.batching.fair_queue import FairQueue
from service.engine.types import SamplingParams
from service.errors import AdapterUnavailable
from service.inference.engine import BatchGenerator, GenOutput, GenRow

log = logging.getLogger(__name__)


class AdapterProvider(Protocol):
    """Maps adapter keys to device slots for one batch; pins them until release()."""

    @property
    def num_slots(self) -> int: ...
    def acquire(self, keys: Sequence[Hashable | None]) -> list[int]: ...
    def release(self, keys: Sequence[Hashable | None]) -> None: ...


@dataclass
class GenerationJob:
    input_ids: list[int]
    params: SamplingParams
    adapter: Hashable | None = None
    tenant: Hashable | None = None  # whose fair share this counts against (a user's storage key)
    on_token: Callable[[int], None] | None = None  # called in the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: GenOutput | None = None
    error: BaseException | None = None
    batch_size: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _future: asyncio.Future[None] | None = None

    def finish(self) -> None:
        """Called once from the worker thread: wakes the awaiting request on its own loop."""
        loop, fut = self._loop, self._future
        if loop is not None and fut is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BatchScheduler:
    def __init__(
        self,
        generator: BatchGenerator,
        *,
        max_batch: int,
        window_ms: float,
        queue_max: int,
        queue_per_tenant: int | None = None,
        adapters: AdapterProvider | None = None,
        on_batch: Callable[[int, int], None] | None = None,  # (rows, tokens generated), after each batch
        before_batch: Callable[[], None] | None = None,
    ) -> None:
        self._generator = generator
        self._max_batch = max_batch
        self._window_s = window_ms / 1000.0
        self._queue: FairQueue[GenerationJob] = FairQueue(queue_max, queue_per_tenant or queue_max)
        self._adapters = adapters
        self._on_batch = on_batch
        self._before_batch = before_batch  # runs on this thread between batches (model updates)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oppu-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._queue.close()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit_nowait(self, job: GenerationJob) -> None:
        """Raises QueueFull (server saturated) or TenantQueueFull (this user's share is used up)."""
        self._queue.put(job.tenant, job)

    async def run(self, job: GenerationJob) -> GenOutput:
        """Queue the job and wait for it without blocking the event loop."""
        loop = asyncio.get_running_loop()
        job._loop, job._future = loop, loop.create_future()
        self.submit_nowait(job)
        try:
            await asyncio.shield(job._future)
        except asyncio.CancelledError:
            job.cancelled.set()  # client went away or deadline hit: free the row at the next token
            raise
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    # --- worker thread ---
    def _collect(self) -> list[GenerationJob]:
        """One batch: wait for a first job, then fill up to max_batch within the window, round-robin
        over users; jobs whose adapter would need one slot too many go back to the queue's front."""
        first = self._queue.get(timeout=0.5)
        if first is None:
            return []
        pending = [first]
        deadline = time.monotonic() + self._window_s
        while len(pending) < self._max_batch:
            got = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if got is None:
                break
            pending.append(got)
        batch: list[GenerationJob] = []
        back: list[tuple[Hashable, GenerationJob]] = []
        keys: set[Hashable] = set()
        limit = self._adapters.num_slots if self._adapters is not None else 0
        for tenant, job in pending:
            if job.cancelled.is_set():
                job.result = GenOutput(token_ids=[], finish_reason="cancelled", step_logits=None)
                job.finish()
                continue
            if job.adapter is not None and job.adapter not in keys and len(keys) >= limit:
                back.append((tenant, job))
                continue
            if job.adapter is not None:
                keys.add(job.adapter)
            batch.append(job)
        if back:
            self._queue.put_back(back)
        return batch

    def _run(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            if batch:
                self._run_batch(batch)
        while (left := self._queue.get(timeout=0)) is not None:
            left[1].error = RuntimeError("server shutting down")
            left[1].finish()

    def _acquire(self, batch: list[GenerationJob]) -> tuple[list[GenerationJob], list[int], list[Hashable | None]]:
        """Slots for the batch: (rows that run, their slots, the keys to release). When the one-call acquire
        fails, each distinct adapter is tried alone, so a broken adapter fails only its own rows."""
        keys = [job.adapter for job in batch]
        if self._adapters is None:
            return batch, [0] * len(batch), keys
        try:
            return batch, self._adapters.acquire(keys), keys
        except Exception:
            log.warning("adapter acquire failed for a batch of %d rows; isolating the failing adapter(s)", len(batch))
        slot_of: dict[Hashable | None, int] = {}
        failed: dict[Hashable | None, Exception] = {}
        for key in dict.fromkeys(keys):
            try:
                slot_of[key] = self._adapters.acquire([key])[0]
            except Exception as exc:  # all or nothing per call: nothing of this key is pinned
                log.warning("adapter %r could not be loaded: %s", key, exc)
                failed[key] = exc
        kept: list[GenerationJob] = []
        for job in batch:
            cause = failed.get(job.adapter)
            if cause is None:
                kept.append(job)
                continue
            job.error = AdapterUnavailable(cause)
            job.error.__cause__ = cause
            job.finish()
        return kept, [slot_of[job.adapter] for job in kept], list(slot_of)

    def _run_batch(self, batch: list[GenerationJob]) -> None:
        if self._before_batch is not None:
            self._before_batch()
        batch, slots, keys = self._acquire(batch)
        if not batch:
            return
        try:
            rows = [GenRow(job.input_ids, job.params, slot) for job, slot in zip(batch, slots, strict=True)]

            def on_token(row: int, token: int) -> bool:
                job = batch[row]
                if job.cancelled.is_set():
                    return False
                if job.on_token is not None:
                    job.on_token(token)
                return True

            outputs = self._generator.generate(rows, on_token=on_token)
            if self._on_batch is not None:
                self._on_batch(len(batch), sum(len(out.token_ids) for out in outputs))
            for job, out in zip(batch, outputs, strict=True):
                job.result, job.batch_size = out, len(batch)
        except Exception as exc:
            log.exception("batch failed")
            for job in batch:
                job.error = exc
        finally:
            if self._adapters is not None:
                self._adapters.release(keys)
            for job in batch:
                job.finish()
