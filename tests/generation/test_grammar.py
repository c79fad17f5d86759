"""GrammarCompiler (service/generation/grammar.py) with the real tokenizer of the tiny test model (the
SmolLM2 tokenizer it is saved with, loaded from its own folder: building the tiny model's folder imports the
Llama classes, seconds this module does not need): what compiles, what is refused (400, never a crash), the
layout both engines compile, and a row matcher's masks."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from service.errors import BadRequest, GenerationFailed
from service.generation.grammar import (
    JSON_STYLE,
    MASK_GRACE_S,
    MASK_PER_TOKEN_S,
    MAX_INTEGER_MULTIPLE_OF,
    MAX_MULTIPLE_OF_PRODUCT,
    MAX_PATTERN_PROPERTIES,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_COUNTS,
    GrammarCompiler,
    RowMatcher,
)
from tests.models import smollm_tokenizer_dir

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(smollm_tokenizer_dir(), local_files_only=True)


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer))


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}


def tokens(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_text_needs_no_grammar(compiler: GrammarCompiler) -> None:
    assert compiler.compile({"type": "text"}) is None


def test_json_object_compiles_to_any_object_in_the_json_dumps_layout(compiler: GrammarCompiler) -> None:
    compiled = compiler.compile({"type": "json_object"})
    assert compiled is not None
    assert (compiled.kind, compiled.schema) == ("json_object", None)
    assert compiled.styled_schema == {"type": "object", "x-guidance": dict(JSON_STYLE)}
    assert compiled.grammar


def test_json_schema_keeps_the_schema_and_adds_the_layout_rules(compiler: GrammarCompiler) -> None:
    compiled = compiler.compile(schema_format(SCHEMA))
    assert compiled is not None
    assert (compiled.kind, compiled.schema) == ("json_schema", SCHEMA)
    styled = dict(compiled.styled_schema)
    assert styled.pop("x-guidance") == {
        "whitespace_flexible": False,
        "item_separator": ", ",
        "key_separator": ": ",
    }
    assert styled == SCHEMA
    assert "x-guidance" not in SCHEMA  # the client's schema is not changed in place


@pytest.mark.parametrize(
    ("response_format", "says"),
    [
        ({"type": "yaml"}, "not supported"),
        ({}, "not supported"),
        ({"type": "json_schema"}, "needs"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": True}}, "needs"),
        ({"type": "json_schema", "json_schema": "object"}, "needs"),
        (schema_format({"type": "nonsense"}), "cannot be used"),
        (schema_format({"$ref": "#/definitions/missing"}), "cannot be used"),
        (schema_format({"type": "string", "pattern": "(("}), "cannot be used"),
        (schema_format({"type": "object", "description": "x" * MAX_SCHEMA_BYTES}), "larger than"),
        # 90 bytes that would compile to GBs of grammar (10**8: llguidance's allocation fails and aborts the process)
        (schema_format({"type": "array", "items": {"type": "integer"}, "minItems": 10**8}), "add up to more than"),
        (schema_format({"type": "array", "maxItems": 10**7}), "add up to more than"),
        (schema_format({"type": "object", "minProperties": float("inf")}), "add up to more than"),
        # many small counts add up; nested anywhere (inside anyOf, items, $defs)
        (
            schema_format(
                {
                    "anyOf": [{"type": "array", "items": {"type": "array", "maxItems": 100}, "maxItems": 100}] * 21,
                }
            ),
            "add up to more than",
        ),
    ],
)
def test_bad_or_oversized_schemas_are_400(
    compiler: GrammarCompiler, response_format: dict[str, Any], says: str
) -> None:
    with pytest.raises(BadRequest) as info:
        compiler.compile(response_format)
    assert info.value.status == 400
    assert says in info.value.message


def test_a_pattern_whose_lexer_fails_at_the_first_tokens_is_400_at_compile(compiler: GrammarCompiler) -> None:
    """50 bytes under every cap, but llguidance's lexer gives up ("too many expressions constructed") once the
    first token is taken: refused here, on the request's thread, not by the engine after ~0.7 s of its step."""
    explosive = {"type": "string", "pattern": "^(a{1000}){1000}$"}
    with pytest.raises(BadRequest, match=r"too many expressions|too slow"):
        compiler.compile(schema_format(explosive))
    assert compiler.compile(schema_format({"type": "string", "pattern": "^(a{30}){30}$"})) is not None


def test_a_schema_just_under_the_size_limit_compiles(compiler: GrammarCompiler) -> None:
    schema: dict[str, Any] = {"type": "object", "description": ""}
    schema["description"] = "x" * (MAX_SCHEMA_BYTES - len(json.dumps(schema)))
    assert len(json.dumps(schema)) == MAX_SCHEMA_BYTES
    assert compiler.compile(schema_format(schema)) is not None


def test_counts_up_to_the_limit_compile(compiler: GrammarCompiler) -> None:
    half = MAX_SCHEMA_COUNTS // 2
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": half, "maxItems": MAX_SCHEMA_COUNTS - half}
    assert compiler.compile(schema_format(schema)) is not None


def test_a_matcher_allows_only_an_opening_brace_first(compiler: GrammarCompiler, tokenizer: Any) -> None:
    compiled = compiler.compile({"type": "json_object"})
    assert compiled is not None
    allowed = compiled.matcher().allowed(compiler.vocab_size)
    assert allowed.shape == (compiler.vocab_size,) and allowed.dtype == np.bool_
    ids = np.flatnonzero(allowed)
    assert len(ids) > 0
    assert all(tokenizer.decode([int(i)]).startswith("{") for i in ids)
    (brace,) = tokens(tokenizer, "{")
    assert allowed[brace]
    assert not allowed[tokens(tokenizer, "a")[0]] and not allowed[tokens(tokenizer, " ")[0]]


def test_ids_past_the_tokenizer_are_never_allowed(compiler: GrammarCompiler) -> None:
    compiled = compiler.compile({"type": "json_object"})
    assert compiled is not None
    allowed = compiled.matcher().allowed(compiler.vocab_size + 64)  # the model's padding rows
    assert not allowed[compiler.vocab_size :].any()


def test_a_matcher_accepts_valid_json_then_only_the_end_of_turn(compiler: GrammarCompiler, tokenizer: Any) -> None:
    compiled = compiler.compile(schema_format(SCHEMA))
    assert compiled is not None
    matcher = compiled.matcher()
    for token in tokens(tokenizer, json.dumps({"name": "Ada", "age": 36})):
        assert matcher.allowed(compiler.vocab_size)[token]
        matcher.accept(token)
    (end,) = np.flatnonzero(matcher.allowed(compiler.vocab_size))
    assert int(end) == tokenizer.eos_token_id


def test_a_matcher_rejects_json_outside_the_schema_and_the_free_whitespace(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    compiled = compiler.compile(schema_format(SCHEMA))
    assert compiled is not None
    for text in ('{"name": "Ada", "age": "old"}', '{ "name": "Ada", "age": 36}', '{"nick": "A"}'):
        matcher = compiled.matcher()
        with pytest.raises(GenerationFailed, match="rejected") as refused:
            for token in tokens(tokenizer, text):
                matcher.accept(token)
        assert refused.value.status == 422  # the request's own schema: not a server fault


def test_each_row_gets_its_own_matcher(compiler: GrammarCompiler, tokenizer: Any) -> None:
    compiled = compiler.compile({"type": "json_object"})
    assert compiled is not None
    first, second = compiled.matcher(), compiled.matcher()
    for token in tokens(tokenizer, "{}"):
        first.accept(token)
    (brace,) = tokens(tokenizer, "{")
    assert second.allowed(compiler.vocab_size)[brace]  # untouched by the first row
    assert not first.allowed(compiler.vocab_size)[brace]
    fresh = compiled.matcher()  # a copy of the pristine matcher: rows never advance it
    assert fresh.allowed(compiler.vocab_size)[brace]


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        # 41 bytes: a lexer of ~N states (N = 5 * 10**6: 61 s and 2.6 GB per matcher, paid again for each row).
        ({"type": "integer", "multipleOf": 4_999_999}, "multipleOf above"),
        ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 99_991}}}, "multipleOf above"),
        # ~K**3 to compile (K = 1500, under the size cap: minutes).
        (
            {"type": "object", "patternProperties": {f"^k{i}x": {"type": "integer"} for i in range(65)}},
            "patternProperties",
        ),
        # Compiles in 0.1 s, then ~30 ms of the engine's step thread per token of every such row.
        ({"type": "string", "pattern": "^(a{300}){300}$"}, "too slow"),
        # llguidance takes a negative step as its absolute value (-999999: 8.4 s and 420 MB).
        ({"type": "integer", "multipleOf": -999_999}, "greater than 0"),
        ({"type": "integer", "multipleOf": 0}, "greater than 0"),
        # Each under the cap, but allOf makes one lexer of their common multiple (9973 and 9967: over a minute).
        ({"allOf": [{"type": "integer", "multipleOf": 9973}, {"type": "integer", "multipleOf": 9967}]}, "product"),
        # allOf merges the objects: 8 x 64 patterns took 53 s.
        (
            {
                "allOf": [
                    {"type": "object", "patternProperties": {f"^b{b}k{i}x": {"type": "integer"} for i in range(40)}}
                    for b in range(2)
                ]
            },
            "patternProperties",
        ),
    ],
)
def test_schemas_whose_automata_or_masks_are_expensive_are_400(
    compiler: GrammarCompiler, schema: dict[str, Any], says: str
) -> None:
    with pytest.raises(BadRequest) as info:
        compiler.compile(schema_format(schema))
    assert says in info.value.message


def test_schemas_differing_only_in_key_order_are_not_one_cache_entry(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    """The grammar writes properties in the schema's order: a cache keyed on sorted keys gave one tenant's
    schema another tenant's order."""
    ba = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}}
    ab = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    first, second = compiler.compile(schema_format(ba)), compiler.compile(schema_format(ab))
    assert first is not None and second is not None and first is not second
    matcher = second.matcher()
    for token in tokens(tokenizer, '{"a": 1, "b": 2}'):
        matcher.accept(token)
    assert not matcher.failed()


def test_the_same_bounds_compile(compiler: GrammarCompiler) -> None:
    assert compiler.compile(schema_format({"type": "integer", "multipleOf": MAX_INTEGER_MULTIPLE_OF}))
    patterns = {f"^k{i}x": {"type": "integer"} for i in range(MAX_PATTERN_PROPERTIES)}
    assert compiler.compile(schema_format({"type": "object", "patternProperties": patterns}))
    assert compiler.compile(schema_format({"type": "number", "multipleOf": 0.001}))
    two = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 100}, "m": {"multipleOf": 1000}}}
    assert MAX_MULTIPLE_OF_PRODUCT == 100 * 1000 and compiler.compile(schema_format(two))  # at the bound


def test_a_schema_is_compiled_once_for_every_row_and_every_request(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building an llguidance matcher costs what the compile costs: it was built again for each of a request's
    n rows (and for the probe), so one request paid an expensive schema n + 2 times."""
    import llguidance

    built: list[int] = []
    real = llguidance.LLMatcher

    class Counting:  # the class's static helpers, and a count of matchers built
        grammar_from_json_schema = staticmethod(real.grammar_from_json_schema)
        validate_grammar = staticmethod(real.validate_grammar)

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            built.append(1)
            return real(*args, **kwargs)

    monkeypatch.setattr(llguidance, "LLMatcher", Counting)
    compiler = GrammarCompiler(tokenizer, 49152)
    fmt = schema_format({"type": "integer", "multipleOf": 9973})
    compiled = compiler.compile(fmt)
    assert compiled is not None
    rows = [compiled.matcher() for _ in range(8)]
    assert compiler.compile(fmt) is compiled  # the same schema again: from the cache
    assert len(built) == 1 and len({id(r) for r in rows}) == 8


class _SlowMasks:
    """An llguidance matcher stand-in whose masks each burn `seconds` of CPU."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def compute_bitmask(self) -> bytes:
        end = time.thread_time() + self.seconds
        while time.thread_time() < end:
            pass
        return b"\xff" * 8


def test_a_row_whose_masks_take_too_much_cpu_fails_alone() -> None:
    """Masks run on the engine's step thread, one row after another: a row whose masks are slow held up every
    row of every step (a step of 8 such rows: 10 -> 174 ms for everyone)."""
    slow = RowMatcher(_SlowMasks(MASK_PER_TOKEN_S * 3), 64)
    with pytest.raises(GenerationFailed) as info:
        for _ in range(1000):
            slow.allowed(64)
    assert info.value.status == 422 and "too slow" in info.value.message
    assert slow.masks * MASK_PER_TOKEN_S * 3 <= MASK_GRACE_S * 1.5 + MASK_PER_TOKEN_S * slow.masks * 3 / 2
    fast = RowMatcher(_SlowMasks(0.0), 64)
    for _ in range(1000):
        assert fast.allowed(64)[:64].all()
