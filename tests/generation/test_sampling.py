"""resolve_sampling (service/generation/sampling.py): the ONE place where the server's bounds and defaults
are applied to decoding options; every refusal is a 4xx ServiceError, never a crash."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from service.config import MAX_N, Settings
from service.errors import BadRequest, ServiceError, Unprocessable
from service.generation.grammar import CompiledGrammar, GrammarCompiler
from service.generation.sampling import (
    GREEDY_BELOW_TEMPERATURE,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MIN_TOP_P,
    SamplingOptions,
    resolve_sampling,
)

SETTINGS = Settings(default_max_new_tokens=16, max_new_tokens_cap=100)
STOP_IDS = frozenset({2, 7})
VOCAB = 50


def resolve(**options: Any) -> Any:
    return resolve_sampling(SamplingOptions(**options), SETTINGS, STOP_IDS, vocab_size=VOCAB)


def refused(**options: Any) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        resolve(**options)
    assert 400 <= info.value.status < 500, info.value
    return info.value


class RecordingCompiler(GrammarCompiler):
    """Records what it is asked to compile (no tokenizer: tests/generation/test_grammar.py compiles for real)."""

    def __init__(self) -> None:
        super().__init__(tokenizer=None, vocab_size=VOCAB)
        self.seen: list[Mapping[str, Any]] = []

    def compile(self, response_format: Mapping[str, Any]) -> CompiledGrammar | None:
        self.seen.append(response_format)
        return None


def test_defaults_are_the_server_default_length_greedy_and_no_processing() -> None:
    resolved = resolve()
    p = resolved.params
    assert p.max_new_tokens == SETTINGS.default_max_new_tokens
    assert (p.temperature, p.top_p, p.seed, p.logprobs, p.grammar) == (0.0, 1.0, None, None, None)
    assert p.stop_token_ids == STOP_IDS
    assert p.plain
    assert (resolved.stop, resolved.n) == ((), 1)


@pytest.mark.parametrize("n", [0, -1, SETTINGS.max_new_tokens_cap + 1])
def test_max_new_tokens_outside_1_to_the_cap_is_422(n: int) -> None:
    error = refused(max_new_tokens=n)
    assert isinstance(error, Unprocessable)
    assert str(SETTINGS.max_new_tokens_cap) in error.message
    assert "max_tokens" in error.message and error.details == {"max_new_tokens_cap": SETTINGS.max_new_tokens_cap}


def test_max_new_tokens_at_the_cap_is_taken() -> None:
    assert resolve(max_new_tokens=SETTINGS.max_new_tokens_cap).params.max_new_tokens == SETTINGS.max_new_tokens_cap


def test_a_tiny_temperature_is_greedy_and_a_tiny_top_p_is_clamped() -> None:
    p = resolve(temperature=GREEDY_BELOW_TEMPERATURE / 10, top_p=1e-300).params
    assert p.greedy
    assert p.top_p == MIN_TOP_P
    kept = resolve(temperature=0.7, top_p=0.9).params
    assert (kept.temperature, kept.top_p) == (0.7, 0.9)


@pytest.mark.parametrize("n", [0, MAX_N + 1])
def test_n_outside_1_to_the_max_is_422(n: int) -> None:
    assert isinstance(refused(n=n), Unprocessable)


def test_n_rows_use_consecutive_seeds() -> None:
    resolved = resolve(n=MAX_N, seed=40, temperature=1.0)
    assert resolved.n == MAX_N
    assert [resolved.row(i).seed for i in range(MAX_N)] == list(range(40, 40 + MAX_N))
    assert resolved.row(0) is resolved.params
    unseeded = resolve(n=3, temperature=1.0)
    assert [unseeded.row(i).seed for i in range(3)] == [None, None, None]  # each row draws its own


def test_stop_strings_are_kept_for_the_text_cut() -> None:
    stops = (*(f"s{i}" for i in range(MAX_STOPS - 1)), "x" * MAX_STOP_CHARS)
    assert resolve(stop=stops).stop == stops


@pytest.mark.parametrize(
    "stop",
    [
        tuple(f"s{i}" for i in range(MAX_STOPS + 1)),
        ("",),
        ("ok", "x" * (MAX_STOP_CHARS + 1)),
    ],
)
def test_too_many_empty_or_too_long_stop_strings_are_422(stop: tuple[str, ...]) -> None:
    assert "stop" in refused(stop=stop).message


@pytest.mark.parametrize("k", [0, MAX_LOGPROBS])
def test_logprobs_in_range_are_passed_on(k: int) -> None:
    assert resolve(logprobs=k).params.logprobs == k


@pytest.mark.parametrize("k", [-1, MAX_LOGPROBS + 1])
def test_logprobs_out_of_range_are_422(k: int) -> None:
    assert "logprobs" in refused(logprobs=k).message


def test_penalties_bias_min_tokens_and_ignore_eos_are_passed_on() -> None:
    p = resolve(
        presence_penalty=0.5, frequency_penalty=-1.5, logit_bias={3: -100.0, 49: 100.0}, min_tokens=4, ignore_eos=True
    ).params
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -1.5)
    assert p.logit_bias == {3: -100.0, 49: 100.0}
    assert (p.min_tokens, p.ignore_eos) == (4, True)
    assert not p.plain  # penalties and biases take the processed path


def test_min_tokens_above_max_new_tokens_is_422() -> None:
    assert resolve(max_new_tokens=5, min_tokens=5).params.min_tokens == 5
    assert "min_tokens" in refused(max_new_tokens=5, min_tokens=6).message
    # Without max_tokens the limit is the server's default: the message says so (it named max_tokens, unsent).
    default = SETTINGS.default_max_new_tokens
    message = refused(min_tokens=default + 1).message
    assert f"0..{default}" in message and "default" in message


@pytest.mark.parametrize("token", [-1, VOCAB])
def test_logit_bias_on_a_token_outside_the_vocabulary_is_422(token: int) -> None:
    error = refused(logit_bias={token: 1.0})
    assert f"0..{VOCAB - 1}" in error.message


def test_without_a_known_vocabulary_token_ids_are_not_checked() -> None:
    options = SamplingOptions(logit_bias={10**6: 1.0})
    assert resolve_sampling(options, SETTINGS, STOP_IDS).params.logit_bias == {10**6: 1.0}


@pytest.mark.parametrize("bias", [100.5, -100.5, float("nan")])
def test_logit_bias_values_outside_plus_minus_100_are_422(bias: float) -> None:
    assert "-100..100" in refused(logit_bias={1: bias}).message


def test_too_many_logit_bias_entries_are_422() -> None:
    options = SamplingOptions(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)})
    with pytest.raises(Unprocessable, match="logit_bias"):
        resolve_sampling(options, SETTINGS, STOP_IDS)  # no vocabulary check: the count alone refuses it


def test_a_response_format_without_a_grammar_compiler_is_400() -> None:
    error = refused(response_format={"type": "json_object"})
    assert isinstance(error, BadRequest) and error.status == 400


def test_a_response_format_goes_to_the_grammar_compiler() -> None:
    compiler = RecordingCompiler()
    fmt = {"type": "json_object"}
    resolved = resolve_sampling(SamplingOptions(response_format=fmt), SETTINGS, STOP_IDS, compiler, VOCAB)
    assert compiler.seen == [fmt]
    assert resolved.params.grammar is None  # what the compiler returned ({"type": "text"} compiles to None)


def test_bounds_are_checked_before_a_grammar_is_compiled() -> None:
    compiler = RecordingCompiler()
    options = SamplingOptions(response_format={"type": "json_object"}, n=MAX_N + 1)
    with pytest.raises(Unprocessable):
        resolve_sampling(options, SETTINGS, STOP_IDS, compiler, VOCAB)
    assert compiler.seen == []
