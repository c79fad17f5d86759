"""The builtin engine: the base model with LoRA slots, the adapter cache, the shared task LoRA merged
into the base weights, and the batch scheduler thread that owns every forward pass.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch

from service.adapters.cache import AdapterCache
from service.adapters.peft_format import AdapterWeights, merge_lora, read_adapter_dir, unmerge
from service.adapters.slots import LoraSlots
from service.batching.fair_queue import QueueFull, TenantQueueFull
from service.batching.scheduler import BatchScheduler, GenerationJob
from service.engine.types import AdapterRef, EngineEvent, EngineRequest, EngineStats, Finished, TokenEvent
from service.errors import Timeout, TooManyRequests, Unavailable
from service.inference.engine import BatchGenerator, GenOutput
from service.inference.loader import LoadedModel


class BuiltinEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache: AdapterCache,
        *,
        slots: LoraSlots,
        context_length: int,
        max_batch: int,
        window_ms: float,
        queue_max: int,
        queue_per_tenant: int,
        max_scale: float,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._loaded = loaded
        self._cache = cache
        self._context_length = context_length
        self._max_scale = max_scale
        generator = BatchGenerator(
            loaded.model, slots=slots, pad_token_id=int(loaded.tokenizer.pad_token_id), device=loaded.device
        )
        self._scheduler = BatchScheduler(
            generator,
            max_batch=max_batch,
            window_ms=window_ms,
            queue_max=queue_max,
            queue_per_tenant=queue_per_tenant,
            adapters=cache,
            on_batch=on_batch,
            before_batch=self._apply_pending_shared,
        )
        # The shared task LoRA is merged into the base weights (every row gets it, at zero cost per token);
        # the touched weights' originals are kept so that a new version replaces it exactly.
        self._shared_version: int | None = None
        self._shared_originals: dict[str, torch.Tensor] = {}
        self._pending: tuple[AdapterWeights | None, int | None] | None = None
        self._shared_lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self._loaded.name

    @property
    def context_length(self) -> int:
        return self._context_length

    def start(self) -> None:
        self._apply_pending_shared()  # start-up: no batch can run yet
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.stop()

    # --- shared task LoRA ---
    @property
    def model(self) -> torch.nn.Module:
        return self._loaded.model  # type: ignore[no-any-return]

    @property
    def cache(self) -> AdapterCache:
        return self._cache

    @property
    def applied_shared(self) -> tuple[int | None, dict[str, torch.Tensor]]:
        """The shared version merged into the weights now, and the originals of the weights it changed."""
        return self._shared_version, self._shared_originals

    @property
    def shared_version(self) -> int | None:
        with self._shared_lock:
            return self._pending[1] if self._pending is not None else self._shared_version

    def use_shared(self, adapter: AdapterRef | None) -> None:
        version = adapter.version if adapter is not None else None
        if version == self.shared_version:
            return
        weights = read_adapter_dir(adapter.directory, max_scale=self._max_scale) if adapter is not None else None
        with self._shared_lock:
            self._pending = (weights, version)

    def _apply_pending_shared(self) -> None:
        with self._shared_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        weights, version = pending
        unmerge(self._loaded.model, self._shared_originals)
        self._shared_originals = merge_lora(self._loaded.model, weights) if weights is not None else {}
        self._shared_version = version

    # --- adapters ---
    def prefetch(self, adapter: AdapterRef) -> None:
        self._cache.prefetch(adapter)

    def drop_owner(self, owner_key: str) -> None:
        self._cache.drop_owner(owner_key)

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=self._scheduler.queued,
            running=0,
            adapter_slots=self._cache.num_slots,
            slots_in_use=len(self._cache.slot_keys()),
            slots_pinned=len(self._cache.pinned()),
        )

    # --- rows ---
    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        def on_token(token: int) -> None:  # scheduler thread -> this request's loop
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        job = GenerationJob(
            list(request.prompt_ids), request.sampling, request.adapter, tenant=request.tenant, on_token=on_token
        )
        task = asyncio.ensure_future(self._bounded(self._scheduler.run(job), request.deadline))
        task.add_done_callback(lambda _: tokens.put_nowait(None))
        try:
            while (token := await tokens.get()) is not None:
                if token not in request.sampling.stop_token_ids:
                    yield TokenEvent(token)
            out = task.result()
            yield Finished(out.finish_reason, len(request.prompt_ids))
        finally:
            if not task.done():
                job.cancelled.set()
                task.cancel()

    @staticmethod
    async def _bounded(awaitable: asyncio.Future[GenOutput] | object, deadline: float) -> GenOutput:
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))  # type: ignore[arg-type]
        except TimeoutError as exc:  # the job is cancelled by scheduler.run: its row is freed
            raise Timeout("generation passed its deadline") from exc
        except TenantQueueFull as exc:  # this user's fair share is used up: others still get served
            raise TooManyRequests(str(exc), headers={"Retry-After": "1"}) from exc
        except QueueFull as exc:
            raise Unavailable("the server is saturated; retry later", headers={"Retry-After": "1"}) from exc
