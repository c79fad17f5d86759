"""What crosses the engine boundary: the prepared request (token ids, sampling, adapter reference, tenant,
deadline) going in, token events and a finish coming out. Plain data: no torch, no users, no HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class AdapterRef:
    """One immutable adapter version: the owner's storage key (never a raw user id), the version number,
    the weights' sha256 and the version directory holding the PEFT pair. Two refs are equal only if
    they name the same bytes, so a retrain or import can never be served from a stale cache entry."""

    owner_key: str
    version: int
    sha256: str
    directory: Path = field(compare=False)
    # Opens the owner's sealed files (service.sealing); None: the files are plaintext.
    seal: FileOpener | None = field(default=None, compare=False, repr=False)


class FileOpener(Protocol):
    """Opens an owner's sealed file (service.sealing.service.UserSeal; read by adapters/peft_format.py)."""

    def open_path(self, purpose: str, path: Path | IO[bytes], allocate: Callable[[int], Any] = ...) -> Any: ...


class GrammarMatcher(Protocol):
    """One row's position in a response format's grammar."""

    def allowed(self, n: int) -> np.ndarray:
        """Which of the first `n` token ids may come next (bool, shape (n,))."""
        ...

    def accept(self, token: int) -> None:
        """Advance past `token` (ValueError if the grammar rejects it)."""
        ...


class ResponseFormat(Protocol):
    """A compiled `response_format` (service.generation.grammar): both engines honour the same grammar, so
    both emit the same JSON (layout included) for the same schema."""

    @property
    def kind(self) -> str:
        """ "json_object" | "json_schema"."""
        ...

    @property
    def schema(self) -> Mapping[str, Any] | None: ...

    @property
    def styled_schema(self) -> Mapping[str, Any]:
        """The JSON schema with its layout rules (llguidance's `x-guidance`: no free whitespace, json.dumps
        separators, which small models need): what both engines compile, so they emit the same JSON."""
        ...

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher for one row (the builtin engine masks each step's logits with it)."""
        ...


@dataclass(frozen=True)
class SamplingParams:
    """Per-row decoding options, already validated by the request path."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None = a fresh random seed per row
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False  # stop tokens are sampled like any other (vLLM's ignore_eos)
    min_tokens: int = 0  # stop tokens are masked until this many tokens were emitted
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: ResponseFormat | None = None  # structured output: a per-row logits mask

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.min_tokens < 0:
            raise ValueError("max_new_tokens and min_tokens must be >= 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError("temperature must be finite and >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain(self) -> bool:
        """No logits processing at all: the row can take the batch's fast path."""
        return not (
            self.presence_penalty or self.frequency_penalty or self.logit_bias or self.grammar is not None
        ) and (self.min_tokens == 0 or self.ignore_eos)


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    adapter: AdapterRef | None  # None: the base model (+ the shared task LoRA)
    tenant: str  # whose fair share of the queue this takes (one per user, whatever the route)
    deadline: float  # time.monotonic() after which the row is dropped with 504
    # Scoring (prefill only, max_new_tokens 0): the logprob of each continuation's tokens after the prompt.
    # The prompt is prefilled once for all of them.
    continuations: tuple[tuple[int, ...], ...] = ()
    # The shared task LoRA current when the request was prepared: the engine applies it before the row runs.
    shared: AdapterRef | None = None
    # When `shared` was read from SQL (time.monotonic(), before the read; None: unknown, taken as now): a read
    # older than the engine's newest never switches it back (a request prepared before a new version's notice).
    shared_read_at: float | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float | None = None  # of the chosen token, under the model's raw distribution
    top: tuple[TokenLogprob, ...] = ()  # the k most likely tokens (k = sampling.logprobs)


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    # scoring requests: per continuation, the logprob of each of its tokens given the prompt and the ones before.
    continuation_logprobs: tuple[tuple[float, ...], ...] = ()


EngineEvent = TokenEvent | Finished


@dataclass(frozen=True)
class StepInfo:
    """What one engine step did (metrics, tests)."""

    index: int
    tokens: int  # tokens in the forward (decode + prompt chunks): never above the step budget
    decode_rows: int
    prefill_tokens: int
    generated: int
    running: int
    seconds: float


@dataclass(frozen=True)
class EngineStats:
    """Capacity and occupancy, for /metrics and /readyz."""

    waiting: int
    running: int
    adapter_slots: int
    slots_in_use: int
    slots_pinned: int
    healthy: bool = True
    extra: Mapping[str, float] = field(default_factory=dict)
    # Owners (storage keys) of the adapters of running and of waiting rows (vLLM's lora_requests_info).
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
