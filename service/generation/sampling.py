"""Decoding options as a client gives them (any route), and the ONE place their bounds are applied and they
become the engine's per-row SamplingParams. The schemas only parse ranges; the server's caps live here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from service.config import MAX_N, Settings
from service.engine.types import SamplingParams
from service.errors import BadRequest, Unprocessable
from service.generation.grammar import GrammarCompiler

# Sampling in float32 breaks down at the extremes (logits / 1e-300 overflows to inf -> NaN probabilities;
# a top_p under ~1e-45 rounds to 0 and keeps no token), and those limits mean greedy decoding anyway.
GREEDY_BELOW_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6
MAX_STOPS = 4
MAX_STOP_CHARS = 200
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding options as the client gave them; `resolve_sampling` applies the server's bounds."""

    max_new_tokens: int | None = None  # None: the server default
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the text (matched across tokens, never included)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    min_tokens: int = 0
    response_format: Mapping[str, Any] | None = None
    n: int = 1  # independent rows (seeded rows use seed, seed + 1, ...)


@dataclass(frozen=True)
class Resolved:
    params: SamplingParams  # of the first row; row i uses seed + i
    stop: tuple[str, ...]
    n: int

    def row(self, i: int) -> SamplingParams:
        seed = self.params.seed
        return replace(self.params, seed=seed + i) if seed is not None and i else self.params


def resolve_sampling(
    options: SamplingOptions,
    settings: Settings,
    stop_ids: frozenset[int],
    grammars: GrammarCompiler | None = None,
    vocab_size: int | None = None,
) -> Resolved:
    n = options.max_new_tokens if options.max_new_tokens is not None else settings.default_max_new_tokens
    if not 1 <= n <= settings.max_new_tokens_cap:
        cap = settings.max_new_tokens_cap
        raise Unprocessable(  # one message for every route: name each route's field
            f"the new-token limit (max_new_tokens; on /v1: max_tokens or max_completion_tokens) must be in 1..{cap}",
            details={"max_new_tokens_cap": cap},
        )
    _check_options(options, n, vocab_size)
    grammar = None
    if options.response_format is not None:
        if grammars is None:
            raise BadRequest("response_format is not available on this server")
        grammar = grammars.compile(options.response_format)
    params = SamplingParams(
        max_new_tokens=n,
        temperature=0.0 if options.temperature < GREEDY_BELOW_TEMPERATURE else options.temperature,
        top_p=max(options.top_p, MIN_TOP_P),
        seed=options.seed,
        stop_token_ids=stop_ids,
        ignore_eos=options.ignore_eos,
        min_tokens=options.min_tokens,
        logprobs=options.logprobs,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        logit_bias=dict(options.logit_bias),
        grammar=grammar,
    )
    return Resolved(params, tuple(options.stop), options.n)


def _check_options(options: SamplingOptions, max_new_tokens: int, vocab_size: int | None) -> None:
    if not 1 <= options.n <= MAX_N:
        raise Unprocessable(f"n must be in 1..{MAX_N}")
    if len(options.stop) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in options.stop):
        raise Unprocessable(f"stop: at most {MAX_STOPS} non-empty strings of up to {MAX_STOP_CHARS} characters")
    if options.logprobs is not None and not 0 <= options.logprobs <= MAX_LOGPROBS:
        raise Unprocessable(f"logprobs / top_logprobs must be in 0..{MAX_LOGPROBS}")
    if not 0 <= options.min_tokens <= max_new_tokens:
        given = "" if options.max_new_tokens is not None else " (the default; none was given)"
        raise Unprocessable(f"min_tokens must be in 0..{max_new_tokens}, the new-token limit{given}")
    if len(options.logit_bias) > MAX_LOGIT_BIAS:
        raise Unprocessable(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens")
    for token, bias in options.logit_bias.items():
        if vocab_size is not None and not 0 <= token < vocab_size:
            raise Unprocessable(f"logit_bias: token id {token} is not in the vocabulary (0..{vocab_size - 1})")
        if not -100.0 <= bias <= 100.0:
            raise Unprocessable("logit_bias values must be in -100..100")
