"""Structured output: `response_format` ({"type": "json_object"} or {"type": "json_schema", ...}) compiled by
llguidance into a per-row token mask that the engine applies to the row's logits each step, so constrained
rows batch with free ones.

Why llguidance: it is the grammar engine behind Guidance and one of vLLM's two structured-output backends,
compiles a JSON schema in milliseconds, and is a small Rust wheel with no torch/triton build chain (xgrammar,
vLLM's other backend, pulls triton in); its per-token mask (~0.2 ms here) is noise next to a forward pass.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from service.errors import BadRequest, GenerationFailed

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

MAX_SCHEMA_BYTES = 64 * 1024
# llguidance expands counted repetition: {"minItems": 10**7} is 90 bytes of schema and GBs of grammar (at 10**8
# its allocation fails and the Rust side aborts the process). No output of max_new_tokens_cap tokens comes near
# these counts, so the sum of all of a schema's item/property counts is capped (4096: compile + first mask
# ~0.1-0.4 s here); string lengths compile to a lexer and cost nothing.
COUNT_KEYWORDS = frozenset({"minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains"})
MAX_SCHEMA_COUNTS = 4096
# Keywords whose values llguidance compiles to automata as large as the value: an integer multipleOf N is a
# lexer of ~N states (N = 10**5: 0.6 s and ~35 MB per matcher; 5 * 10**6: 61 s and 2.6 GB, 41 bytes of schema),
# patternProperties of K disjoint patterns ~K**3 (K = 200: 0.7 s; 1500: minutes).
MAX_INTEGER_MULTIPLE_OF = 10_000
# allOf merges integer multipleOf values into one lexer for their common multiple (997 and 991: 2.5 s and
# 190 MB; 9973 and 9967: over a minute): their product over the schema is capped too (10**5: ~0.6 s).
MAX_MULTIPLE_OF_PRODUCT = 100_000
MAX_PATTERN_PROPERTIES = 64
# Masks computed (and a token taken) when a response format is compiled, to refuse grammars that fail at once.
PROBE_STEPS = 3
# A row's masks are computed on the engine's step thread, one row after another: every other row of the step
# waits for them. A mask of an ordinary schema takes ~0.02-0.1 ms of CPU here (the first up to ~1 ms); a
# pattern like (a{300}){300} compiles in 0.1 s and then costs ~30 ms a mask (a step of 8 such rows: 10 -> 174 ms
# for everyone). CPU time of the computing thread (not wall time: a preempted thread is not the grammar's fault).
PROBE_MASK_MAX_S = 0.02  # the slowest probe mask: above, 400 at compile
MASK_GRACE_S = 0.1  # a row's masks may take this much CPU in all, plus MASK_PER_TOKEN_S per mask; above: 422
MASK_PER_TOKEN_S = 0.002
COMPILED_CACHE_SIZE = 64  # compiled response formats kept (clients repeat their schema)
# JSON laid out as json.dumps does: small models otherwise loop on the whitespace the grammar allows.
JSON_STYLE: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled response format: shareable between rows; each row gets its own matcher, a copy of the one
    built at compile time (building one costs as much as the compile: it was paid again for every row)."""

    kind: str  # "json_object" | "json_schema"
    schema: Mapping[str, Any] | None  # the JSON schema (None for any JSON object)
    styled_schema: Mapping[str, Any]  # the schema with JSON_STYLE as llguidance's x-guidance (what vLLM compiles)
    grammar: str  # llguidance's serialized grammar of styled_schema
    _pristine: Any  # an llguidance.LLMatcher at the start of the grammar, never advanced (only copied)
    vocab_size: int

    def matcher(self) -> RowMatcher:
        return RowMatcher(self._pristine.deep_copy(), self.vocab_size)


class RowMatcher:
    """One row's position in the grammar: which tokens it allows next (the engine masks the rest). (Not
    llguidance.torch: importing it runs torch.compile; a bit per token unpacked with numpy is enough.)"""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self._vocab = vocab_size
        self.masks = 0
        self.mask_seconds = 0.0  # CPU time of this row's masks so far
        self.slowest_mask_s = 0.0

    def allowed(self, n: int) -> np.ndarray:
        """Which of the first `n` token ids the grammar allows next (bool, shape (n,)); ids past the
        tokenizer's words (padding rows of the model) never are. 422 once this row's masks have taken more
        CPU than MASK_GRACE_S + MASK_PER_TOKEN_S per mask (they hold up every row of the step)."""
        started = time.thread_time()
        mask = self._m.compute_bitmask()
        spent = time.thread_time() - started
        self.masks += 1
        self.mask_seconds += spent
        self.slowest_mask_s = max(self.slowest_mask_s, spent)
        if self.mask_seconds > MASK_GRACE_S + MASK_PER_TOKEN_S * self.masks:
            raise GenerationFailed.grammar(
                f"the response format's token masks are too slow ({self.mask_seconds:.2f} s of CPU for "
                f"{self.masks} tokens); use a simpler schema or pattern"
            )
        bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
        out = np.zeros(n, dtype=np.bool_)
        m = min(n, bits.shape[0])
        out[:m] = bits[:m].astype(np.bool_)
        return out

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise GenerationFailed.grammar(f"the grammar rejected token {token}: {self.error()}")

    def error(self) -> str:
        """The matcher's error, first line only (the rest is its internal state)."""
        return str(self._m.get_error()).split("\n", 1)[0]

    def failed(self) -> bool:
        return bool(self._m.is_error())


class GrammarCompiler:
    """Compiles response formats for the served tokenizer (the tokenizer tables are built once, lazily)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, CompiledGrammar] = OrderedDict()  # by the schema's JSON, LRU

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size)
            return self._tokenizer

    def compile(self, response_format: Mapping[str, Any]) -> CompiledGrammar | None:
        """None for {"type": "text"}; 400 for anything llguidance cannot compile, or whose masks are slow.
        The same schema again is served from a small cache (tenants share nothing mutable: rows copy)."""
        kind = response_format.get("type")
        if kind == "text":
            return None
        schema = _schema_of(kind, response_format)
        key = json.dumps([kind, schema])  # keys in their order: the grammar writes properties in it
        with self._lock:
            cached = self._compiled.get(key)
            if cached is not None:
                self._compiled.move_to_end(key)
                return cached
        compiled = self._compile(str(kind), schema)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, kind: str, schema: Mapping[str, Any]) -> CompiledGrammar:
        import llguidance

        styled = {**schema, "x-guidance": dict(JSON_STYLE)}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(styled))
        tokenizer = self._llg_tokenizer()
        message = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if message:
            raise BadRequest(f"response_format: the JSON schema cannot be used: {message}")
        pristine = llguidance.LLMatcher(tokenizer, grammar)
        compiled = CompiledGrammar(
            kind, schema if kind == "json_schema" else None, styled, grammar, pristine, self.vocab_size
        )
        _probe(compiled)
        return compiled


def _probe(compiled: CompiledGrammar) -> None:
    """The first PROBE_STEPS masks of a row, here on the request's thread: some grammars that validate fail
    only when the lexer builds its first states (a pattern like (a{1000}){1000}: 50 bytes of schema, ~0.7 s
    for the first mask, then "too many expressions constructed"). Refused with 400 here, they never reach
    the engine's thread, where every row's step would wait for them."""
    matcher = compiled.matcher()
    try:
        for _ in range(PROBE_STEPS):
            allowed = np.flatnonzero(matcher.allowed(compiled.vocab_size))
            if matcher.failed() or not len(allowed):
                break
            matcher.accept(int(allowed[0]))
    except GenerationFailed:
        pass  # a token the grammar rejects is the error checked below; a slow mask, the time checked below
    if matcher.failed():
        raise BadRequest(f"response_format: the JSON schema cannot be used: {matcher.error()}")
    if matcher.slowest_mask_s > PROBE_MASK_MAX_S:
        raise BadRequest(
            f"response_format: the JSON schema's token masks are too slow to apply ({matcher.slowest_mask_s * 1e3:.0f}"
            f" ms for one token; at most {PROBE_MASK_MAX_S * 1e3:.0f} ms): use a simpler schema or pattern"
        )


def _schema_of(kind: Any, response_format: Mapping[str, Any]) -> Mapping[str, Any]:
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise BadRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise BadRequest("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"response_format: the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    if _counts(schema) > MAX_SCHEMA_COUNTS:
        raise BadRequest(
            f"response_format: the JSON schema's {', '.join(sorted(COUNT_KEYWORDS))} add up to more than "
            f"{MAX_SCHEMA_COUNTS}"
        )
    _check_automata_sizes(schema)
    return schema


def _check_automata_sizes(schema: Mapping[str, Any]) -> None:
    """400 for a multipleOf that is not positive or above MAX_INTEGER_MULTIPLE_OF, multipleOf values whose product
    is above MAX_MULTIPLE_OF_PRODUCT (allOf merges them into one lexer for their common multiple), or more than
    MAX_PATTERN_PROPERTIES patternProperties in the whole schema (allOf merges objects). Conservative: inside
    const/enum values too."""
    product, patterns = 1.0, 0
    for node in _objects(schema):
        step = node.get("multipleOf")
        if _is_number(step):
            if not step > 0:
                raise BadRequest("response_format: multipleOf must be greater than 0")
            if step > MAX_INTEGER_MULTIPLE_OF:
                raise BadRequest(f"response_format: multipleOf above {MAX_INTEGER_MULTIPLE_OF} is not supported")
            product *= max(1.0, float(step))
        if isinstance(node.get("patternProperties"), Mapping):
            patterns += len(node["patternProperties"])
    if product > MAX_MULTIPLE_OF_PRODUCT:
        raise BadRequest(
            f"response_format: multipleOf values whose product is above {MAX_MULTIPLE_OF_PRODUCT} are not supported"
        )
    if patterns > MAX_PATTERN_PROPERTIES:
        raise BadRequest(f"response_format: at most {MAX_PATTERN_PROPERTIES} patternProperties in one schema")


def _counts(schema: Mapping[str, Any]) -> float:
    """The sum of every numeric COUNT_KEYWORDS value anywhere in the schema. Conservative: the same key inside a
    const/enum value counts too."""
    values = (v for node in _objects(schema) for k, v in node.items() if k in COUNT_KEYWORDS)
    return float(sum(abs(v) for v in values if _is_number(v)))


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _objects(schema: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every JSON object in the schema, at any nesting depth (iterative: no recursion limit), values included."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
