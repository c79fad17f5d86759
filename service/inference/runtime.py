"""The serving runtime: ONE loaded base model, its tokenizer, the batch generator and the scheduler.

It turns prompt text into token ids, checks the context limit and runs generation through the
batching scheduler so that the event loop never blocks on a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from service.batching.scheduler import AdapterProvider, BatchScheduler, GenerationJob
from service.config import Settings
from service.errors import PromptTooLong
from service.inference.engine import BatchGenerator, GenOutput, SamplingParams
from service.inference.loader import LoadedModel
from service.inference.tokens import encode_prompt, stop_token_ids


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
        on_batch: Callable[[int], None] | None = None,
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
            adapters=adapters,
            on_batch=on_batch,
        )

    @property
    def model_name(self) -> str:
        return self.loaded.name

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = encode_prompt(self.tokenizer, prompt)
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
    ) -> GenerationJob:
        return GenerationJob(input_ids=input_ids, params=params, adapter=adapter, on_token=on_token)

    async def complete(self, input_ids: list[int], params: SamplingParams, adapter: Hashable | None = None) -> Completion:
        out: GenOutput = await self.scheduler.run(self.job(input_ids, params, adapter))
        return Completion(self.decode(out.token_ids), out.token_ids, len(input_ids), out.finish_reason)

    def complete_blocking(self, input_ids: list[int], params: SamplingParams) -> Completion:
        """The runtime called directly, without the scheduler (benchmarks' baseline, CLI)."""
        from service.inference.engine import GenRow

        out = self.generator.generate([GenRow(input_ids, params, 0)])[0]
        return Completion(self.decode(out.token_ids), out.token_ids, len(input_ids), out.finish_reason)
