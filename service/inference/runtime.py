"""The serving runtime: ONE loaded base model, its tokenizer, the batch generator and the scheduler.

It turns prompt text into token ids, checks the context limit and runs generation through the
batching scheduler so that the event loop never blocks on a forward pass.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from service.adapters.weights import AdapterWeights
from service.batching.fair_queue import QueueFull, TenantQueueFull
from service.batching.scheduler import AdapterProvider, BatchScheduler, GenerationJob
from service.config import Settings
from service.errors import PromptTooLong, Timeout, TooManyRequests, Unavailable
from service.inference.engine import BatchGenerator, GenOutput, SamplingParams
from service.inference.loader import LoadedModel
from service.inference.tokens import encode_messages, encode_prompt, stop_token_ids


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str


class ModelRuntime:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: Settings,
        *,
        slots: Any = None,
        adapters: AdapterProvider | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.settings = settings
        self.tokenizer = loaded.tokenizer
        self.stop_ids = stop_token_ids(loaded.tokenizer, loaded.model.config)
        self.context_length = int(getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048)
        self.generator = BatchGenerator(
            loaded.model, slots=slots, pad_token_id=int(loaded.tokenizer.pad_token_id), device=loaded.device
        )
        self.scheduler = BatchScheduler(
            self.generator,
            max_batch=settings.batch_max_size,
            window_ms=settings.batch_window_ms,
            queue_max=settings.queue_max,
            queue_per_tenant=settings.queue_per_user_max,
            adapters=adapters,
            on_batch=on_batch,
            before_batch=self._apply_pending_shared,
        )
        # The shared task LoRA is merged into the base weights (every row gets it, at zero cost per
        # token); originals of the touched weights are kept so a new version replaces it exactly.
        self.shared_version: int | None = None
        self._shared_originals: dict[str, torch.Tensor] = {}
        self._pending_shared: tuple[AdapterWeights | None, int | None] | None = None
        self._shared_lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.loaded.name

    def start(self) -> None:
        self.scheduler.start()

    @property
    def shared_target(self) -> int | None:
        """The shared version the base will have once pending changes are applied."""
        with self._shared_lock:
            return self._pending_shared[1] if self._pending_shared is not None else self.shared_version

    def request_shared(self, weights: AdapterWeights | None, version: int | None) -> None:
        """Queue a shared-LoRA change; the batch thread applies it before its next batch."""
        with self._shared_lock:
            self._pending_shared = (weights, version)

    def apply_shared_now(self, weights: AdapterWeights | None, version: int | None) -> None:
        """Only while no batch can run (start-up)."""
        self.request_shared(weights, version)
        self._apply_pending_shared()

    def _base_linear(self, path: str) -> torch.nn.Linear:
        module = self.loaded.model.get_submodule(path)
        base = getattr(module, "base", module)  # a slot-wrapped Linear keeps the original as .base
        assert isinstance(base, torch.nn.Linear)
        return base

    @torch.no_grad()
    def _apply_pending_shared(self) -> None:
        with self._shared_lock:
            pending, self._pending_shared = self._pending_shared, None
        if pending is None:
            return
        weights, version = pending
        for path, original in self._shared_originals.items():
            self._base_linear(path).weight.copy_(original)
        self._shared_originals = {}
        if weights is not None:
            for path, m in weights.modules.items():
                weight = self._base_linear(path).weight
                self._shared_originals[path] = weight.detach().clone()
                delta = (m.b.float() @ m.a.float()) * m.scaling  # (d_out, d_in)
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
        self.shared_version = version

    def stop(self) -> None:
        self.scheduler.stop()

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        return self.check_length(encode_prompt(self.tokenizer, prompt), max_new_tokens)

    def encode_chat(self, messages: list[dict[str, str]], max_new_tokens: int) -> list[int]:
        return self.check_length(encode_messages(self.tokenizer, messages), max_new_tokens)

    def encode_raw(self, text: str, max_new_tokens: int) -> list[int]:
        ids = [int(i) for i in self.tokenizer(text)["input_ids"]]
        return self.check_length(ids, max_new_tokens)

    def check_length(self, ids: list[int], max_new_tokens: int) -> list[int]:
        if len(ids) + max_new_tokens > self.context_length:
            raise PromptTooLong(
                f"prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"model's context of {self.context_length} tokens",
                details={"prompt_tokens": len(ids), "context_length": self.context_length},
            )
        return ids

    def params(self, *, max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=self.stop_ids,
        )

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def job(
        self,
        input_ids: list[int],
        params: SamplingParams,
        adapter: Hashable | None = None,
        on_token: Callable[[int], None] | None = None,
        tenant: Hashable | None = None,
    ) -> GenerationJob:
        return GenerationJob(input_ids=input_ids, params=params, adapter=adapter, on_token=on_token, tenant=tenant)

    async def complete(
        self,
        input_ids: list[int],
        params: SamplingParams,
        adapter: Hashable | None = None,
        tenant: Hashable | None = None,
    ) -> Completion:
        job = self.job(input_ids, params, adapter, tenant=tenant)
        out: GenOutput = await self._bounded(self.scheduler.run(job))
        return Completion(self.decode(out.token_ids), out.token_ids, len(input_ids), out.finish_reason)

    async def _bounded(self, awaitable: Awaitable[GenOutput]) -> GenOutput:
        try:
            return await asyncio.wait_for(awaitable, self.settings.request_timeout_s)
        except TimeoutError as exc:  # the job is cancelled by scheduler.run: its row is freed
            raise Timeout(f"generation exceeded the {self.settings.request_timeout_s:g} s deadline") from exc
        except TenantQueueFull as exc:  # this user's fair share is used up: others still get served
            raise TooManyRequests(str(exc), headers={"Retry-After": "1"}) from exc
        except QueueFull as exc:
            raise Unavailable("the server is saturated; retry later", headers={"Retry-After": "1"}) from exc

    async def stream(
        self,
        input_ids: list[int],
        params: SamplingParams,
        adapter: Hashable | None = None,
        tenant: Hashable | None = None,
    ) -> AsyncIterator[str | Completion]:
        """Yields text deltas as tokens are produced, then the Completion. Closing the iterator
        (client gone) cancels the row and frees its slot pin."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        def on_token(token: int) -> None:  # worker thread -> this request's loop
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        job = self.job(input_ids, params, adapter, on_token=on_token, tenant=tenant)
        task = asyncio.ensure_future(self._bounded(self.scheduler.run(job)))
        task.add_done_callback(lambda _: tokens.put_nowait(None))
        emitted: list[int] = []
        sent = ""
        try:
            while (token := await tokens.get()) is not None:
                if token in self.stop_ids:
                    continue
                emitted.append(token)
                text = self.decode(emitted)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
                    continue
                if len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
            out = task.result()
            text = self.decode(out.token_ids)
            if len(text) > len(sent):
                yield text[len(sent) :]
            yield Completion(text, out.token_ids, len(input_ids), out.finish_reason)
        finally:
            if not task.done():
                job.cancelled.set()
                task.cancel()

    def complete_blocking(self, input_ids: list[int], params: SamplingParams) -> Completion:
        """The runtime called directly, without the scheduler (benchmarks' baseline, CLI)."""
        from service.inference.engine import GenRow

        out = self.generator.generate([GenRow(input_ids, params, 0)])[0]
        return Completion(self.decode(out.token_ids), out.token_ids, len(input_ids), out.finish_reason)
