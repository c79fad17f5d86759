"""service/openai_compat/service.py without a model: refusing unknown parameters, the mapping of OpenAI
fields to sampling options and personalization, `model` -> whose data (real SQLite, users created as the admin
API creates them), the response and SSE shapes (`_Format`) on a byte-level fake codec, and the two entry points
(`chat`, `complete`) over the real preparation step with a scripted fake engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec
from service.config import Settings
from service.db.session import Database, unit_of_work
from service.engine.base import EngineLimits
from service.engine.types import EngineRequest, FinishReason, SamplingParams, TokenLogprob
from service.errors import Forbidden, NotFound, ServiceError, Timeout, Unprocessable, UnsupportedParameter
from service.generation.prepare import ChatTurn, PreparedRequest, Preparer
from service.generation.service import Completion, Delta
from service.generation.text import TokenOut
from service.history.service import UserCorpus
from service.openai_compat.schemas import ChatCompletionIn, CommonParams, CompletionIn
from service.openai_compat.service import (
    DEFAULT_CHAT_RETRIEVAL_K,
    OPENAI_DEFAULT_TEMPERATURE,
    PERSONAL,
    Target,
    _Format,
    _sampling,
    _spec,
    chat,
    complete,
    list_models,
    refuse_unsupported,
    resolve_target,
)
from service.retrieval.bm25 import BM25Cache
from service.streams import StreamRegistry
from service.tenancy import Caller, UserRef, authenticate
from tests.factories import FakeCodec, FakeEngine, migrated_sqlite, new_user, sqlite_copy

BASE = "tiny-base"
ADMIN_KEY = "admin-key-for-these-tests-0123456789"
CODEC = FakeCodec()
ALICE = UserRef(pk=1, user_id="alice", storage_key="a" * 32)
MESSAGES = [{"role": "user", "content": "hi"}]


def chat_body(**fields: Any) -> ChatCompletionIn:
    return ChatCompletionIn.model_validate({"model": PERSONAL, "messages": MESSAGES, **fields})


def text_body(**fields: Any) -> CompletionIn:
    return CompletionIn.model_validate({"model": PERSONAL, "prompt": "hi", **fields})


# --- refusing what is not implemented ---


def test_unknown_parameters_are_refused_by_name_with_the_accepted_list() -> None:
    body = chat_body(tools=[{"type": "function"}], parallel_tool_calls=True, functions=None)
    with pytest.raises(UnsupportedParameter) as info:
        refuse_unsupported(body)
    error = info.value
    assert (error.status, error.code) == (400, "unsupported_parameter")
    assert "parallel_tool_calls, tools" in error.message
    assert error.details["unsupported"] == ["parallel_tool_calls", "tools"]  # `functions: null` says nothing
    accepted = error.details["accepted"]
    assert accepted == sorted(ChatCompletionIn.model_fields)
    assert {"messages", "max_completion_tokens", "top_logprobs", "retrieval_k"} <= set(accepted)


def test_unknown_fields_of_chat_messages_are_refused_once_each() -> None:
    message = {"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}], "name": "bot"}
    body = chat_body(messages=[message, {**message, "audio": {"id": "a"}}, {"role": "user", "content": "y"}])
    with pytest.raises(UnsupportedParameter) as info:
        refuse_unsupported(body)
    # `name` is accepted (and not used); each unknown field is named once, however many messages hold it.
    assert info.value.details["unsupported"] == ["messages[].tool_calls", "messages[].audio"]


def test_content_parts_other_than_text_are_refused_by_name_not_dropped() -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    text = {"type": "text", "text": "what is this?", "cache_control": {"type": "ephemeral"}}
    body = chat_body(messages=[{"role": "user", "content": [text, image, {"type": "input_audio"}]}])
    with pytest.raises(UnsupportedParameter) as info:
        refuse_unsupported(body)
    assert info.value.details["unsupported"] == [
        "messages[].content[].cache_control", "messages[].content[].type=image_url",
        "messages[].content[].type=input_audio",
    ]  # fmt: skip


def test_text_content_parts_are_joined_and_must_carry_text() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    body = chat_body(messages=[{"role": "user", "content": parts}])
    refuse_unsupported(body)
    assert body.messages[0].text() == "Hello, world"
    for bad in ({"type": "text"}, {"type": "text", "text": {"a": 1}}, {"text": "no type"}):
        with pytest.raises(ValidationError):
            chat_body(messages=[{"role": "user", "content": [bad]}])


def test_stream_options_without_stream_are_refused_not_ignored() -> None:
    for stream in (None, False):
        with pytest.raises(ValidationError, match="stream_options"):
            chat_body(stream=stream, stream_options={"include_usage": True})
    assert chat_body(stream=True, stream_options={"include_usage": True}).stream_options is not None


def test_legacy_completion_parameters_are_refused() -> None:
    with pytest.raises(UnsupportedParameter) as info:
        refuse_unsupported(text_body(echo=True, best_of=2, suffix="!"))
    assert info.value.details["unsupported"] == ["best_of", "echo", "suffix"]
    assert "prompt" in info.value.details["accepted"] and "messages" not in info.value.details["accepted"]


def test_unknown_stream_options_are_refused_by_name() -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    with pytest.raises(UnsupportedParameter) as info:
        refuse_unsupported(body)
    assert info.value.details["unsupported"] == ["stream_options.continuous_usage_stats"]


def test_known_parameters_pass() -> None:
    refuse_unsupported(
        chat_body(temperature=0.5, user="end-user-7", stream=True, stream_options={"include_usage": True})
    )
    refuse_unsupported(text_body(logprobs=2, echo=None))


def test_fields_a_router_adds_at_their_neutral_values_pass_and_other_values_do_not() -> None:
    """vllm-router 0.1.17 re-serialises every /v1 body with these (captured from the real router)."""
    chat_added = {
        "no_stop_trim": False, "continue_final_message": False, "skip_special_tokens": True,
        "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False,
        "include_reasoning": True,
    }  # fmt: skip
    refuse_unsupported(chat_body(**chat_added))
    refuse_unsupported(text_body(echo=False, no_stop_trim=False, skip_special_tokens=True, return_hidden_states=False))
    with pytest.raises(UnsupportedParameter) as info:
        refuse_unsupported(text_body(echo=True, skip_special_tokens=False, return_hidden_states=True))
    assert info.value.details["unsupported"] == ["echo", "return_hidden_states", "skip_special_tokens"]
    with pytest.raises(UnsupportedParameter):
        refuse_unsupported(text_body(echo=0))  # falsy is not the neutral value


# --- OpenAI fields -> sampling options ---


def test_openai_defaults_apply_when_a_field_is_absent() -> None:
    options = _sampling(chat_body(), None, None)
    assert options.temperature == OPENAI_DEFAULT_TEMPERATURE == 1.0  # OpenAI samples by default: so do we
    assert (options.top_p, options.seed, options.stop, options.logprobs) == (1.0, None, (), None)
    assert (options.presence_penalty, options.frequency_penalty, dict(options.logit_bias)) == (0.0, 0.0, {})
    assert (options.ignore_eos, options.min_tokens, options.response_format, options.n) == (False, 0, None, 1)
    assert options.max_new_tokens is None  # the server's default length


def test_given_fields_are_kept_including_zeros() -> None:
    body = chat_body(
        temperature=0.0,
        top_p=0.5,
        seed=7,
        stop="\n",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        ignore_eos=True,
        min_tokens=2,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    )
    options = _sampling(body, 12, 4)
    assert options.temperature == 0.0  # greedy asked for, not replaced by the default
    assert (options.top_p, options.seed, options.stop) == (0.5, 7, ("\n",))
    assert (options.presence_penalty, options.frequency_penalty) == (0.5, -0.5)
    assert (options.ignore_eos, options.min_tokens, options.n) == (True, 2, 3)
    assert (options.max_new_tokens, options.logprobs) == (12, 4)
    assert options.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}},
    }
    assert _sampling(text_body(stop=["a", "b"]), None, None).stop == ("a", "b")


def test_logit_bias_keys_are_token_ids() -> None:
    options = _sampling(text_body(logit_bias={"50": 2.0, "-3": -1.0, "007": 0.5}), None, None)
    assert dict(options.logit_bias) == {50: 2.0, -3: -1.0, 7: 0.5}  # -3 is refused later: not in the vocabulary


@pytest.mark.parametrize(
    "key",
    [
        "abc",
        "",
        "1.5",
        " 5",
        "+5",
        "--5",
        "5-",
        "\u00b2",
        "\u0663",
        pytest.param("1" * 5000, id="5000-digits"),
        "1" * 11,
    ],
)
def test_a_logit_bias_key_that_is_not_a_token_id_is_400(key: str) -> None:
    # "--5", "²" (a digit to str.isdigit, not to int) and 5000 digits (over int()'s 4300) used to be a 500.
    with pytest.raises(UnsupportedParameter, match="logit_bias keys must be token ids"):
        _sampling(text_body(logit_bias={key: 1.0}), None, None)


def test_a_token_id_named_twice_in_logit_bias_is_400() -> None:
    with pytest.raises(UnsupportedParameter, match="more than once"):
        _sampling(text_body(logit_bias={"42": 1.0, "0042": 2.0}), None, None)


# --- personalization: chat with the personal model is grounded, raw completions are not ---


def test_chat_with_the_personal_model_retrieves_and_uses_the_profile_and_adapter() -> None:
    spec = _spec(Target(ALICE, True), chat_body(), (ChatTurn("user", "hi"),), _sampling(chat_body(), None, None))
    p = spec.personalization
    assert (p.retrieval_k, p.use_profile, p.use_adapter) == (DEFAULT_CHAT_RETRIEVAL_K, True, True)
    assert DEFAULT_CHAT_RETRIEVAL_K == 3
    assert spec.user == ALICE


def test_a_raw_completion_with_the_personal_model_uses_the_adapter_only() -> None:
    spec = _spec(Target(ALICE, True), text_body(), "hi", _sampling(text_body(), None, None))
    p = spec.personalization
    assert (p.retrieval_k, p.use_profile, p.use_adapter) == (0, False, True)
    assert spec.prompt == "hi"


def test_the_base_model_uses_none_of_the_users_data_unless_asked() -> None:
    body = chat_body(model=BASE)
    p = _spec(Target(ALICE, False), body, (ChatTurn("user", "hi"),), _sampling(body, None, None)).personalization
    assert (p.retrieval_k, p.use_profile, p.use_adapter) == (0, False, False)
    asked = chat_body(model=BASE, retrieval_k=2, use_profile=True)
    p = _spec(Target(ALICE, False), asked, (ChatTurn("user", "hi"),), _sampling(asked, None, None)).personalization
    assert (p.retrieval_k, p.use_profile, p.use_adapter) == (2, True, False)


def test_the_client_may_turn_the_grounding_off_or_on() -> None:
    off = chat_body(retrieval_k=0, use_profile=False)
    p = _spec(Target(ALICE, True), off, (ChatTurn("user", "hi"),), _sampling(off, None, None)).personalization
    assert (p.retrieval_k, p.use_profile, p.use_adapter) == (0, False, True)
    on = text_body(retrieval_k=5, use_profile=True)
    p = _spec(Target(ALICE, True), on, "hi", _sampling(on, None, None)).personalization
    assert (p.retrieval_k, p.use_profile) == (5, True)


def test_without_a_user_nothing_is_retrieved() -> None:
    body = chat_body(model=BASE, retrieval_k=5)
    spec = _spec(Target(None, False), body, (ChatTurn("user", "hi"),), _sampling(body, None, None))
    assert (spec.user, spec.personalization.retrieval_k) == (None, 0)


# --- model -> target ---


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_sqlite(tmp_path_factory.mktemp("openai-db"))


@pytest.fixture
def db(template: Path, tmp_path: Path) -> Iterator[Database]:
    database = sqlite_copy(template, tmp_path)
    yield database
    database.engine.dispose()


def caller_of(db: Database, key: str) -> Caller:
    with unit_of_work(db.session_factory) as session:
        return authenticate(session, key, ADMIN_KEY)


def target(db: Database, caller: Caller, model: str) -> Target:
    return resolve_target(db.session_factory, BASE, caller, model)


def refusal(db: Database, caller: Caller, model: str) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        target(db, caller, model)
    return info.value


def test_personal_and_user_own_id_are_the_callers_own_adapter(db: Database) -> None:
    alice, key = new_user(db, "alice")
    new_user(db, "bob")
    caller = caller_of(db, key)
    assert target(db, caller, PERSONAL) == Target(alice, True)
    assert target(db, caller, "user:alice") == Target(alice, True)


def test_user_of_another_id_is_403_for_a_user_whether_or_not_it_exists(db: Database) -> None:
    _, key = new_user(db, "alice")
    new_user(db, "bob")
    caller = caller_of(db, key)
    for model in ("user:bob", "user:nobody"):  # no existence oracle: both 403
        error = refusal(db, caller, model)
        assert isinstance(error, Forbidden) and error.status == 403


def test_an_admin_names_any_user_and_gets_404_for_a_missing_one(db: Database) -> None:
    bob, _ = new_user(db, "bob")
    admin = caller_of(db, ADMIN_KEY)
    assert admin.is_admin
    assert target(db, admin, "user:bob") == Target(bob, True)
    assert isinstance(refusal(db, admin, "user:nobody"), NotFound)
    assert isinstance(refusal(db, admin, "user:../etc"), Unprocessable)  # the user id rule, before any lookup


def test_the_base_model_name_is_the_plain_model_on_the_callers_tenant(db: Database) -> None:
    alice, key = new_user(db, "alice")
    # A user still owns the request (its queue share), but none of its data shape the answer.
    assert target(db, caller_of(db, key), BASE) == Target(alice, False)
    assert target(db, caller_of(db, ADMIN_KEY), BASE) == Target(None, False)


def test_an_unknown_model_is_404_naming_the_models_route(db: Database) -> None:
    _, key = new_user(db, "alice")
    for caller, model in ((caller_of(db, key), "gpt-4o"), (caller_of(db, ADMIN_KEY), PERSONAL)):
        error = refusal(db, caller, model)
        assert isinstance(error, NotFound) and error.status == 404
        assert "/v1/models" in error.message


def test_models_listed_are_the_ones_a_caller_may_name() -> None:
    assert [m.id for m in list_models(Caller(is_admin=False, user_pk=1, user_id="alice"), BASE).data] == [
        PERSONAL,
        BASE,
    ]
    assert [m.id for m in list_models(Caller(is_admin=True), BASE).data] == [BASE]


# --- response and stream shapes ---


def prepared(rows: int = 1, logprobs: int | None = None) -> PreparedRequest:
    sampling = SamplingParams(max_new_tokens=8, logprobs=logprobs)
    row = EngineRequest("r", (CODEC.BOS, 1, 2), sampling, None, "t", 0.0)
    return PreparedRequest(tuple(row for _ in range(rows)), (), None, None)


def token(text: str, offset: int, logprob: float = -0.5) -> TokenOut:
    (tid,) = CODEC.ids(text)
    return TokenOut(tid, offset, logprob, (TokenLogprob(tid, logprob), TokenLogprob(ord("?"), -3.0)))


def completion(text: str, *, reason: str = "stop", index: int = 0, logprobs: int | None = None) -> Completion:
    tokens = [token(c, i) for i, c in enumerate(text)]
    return Completion(text, tokens, len(text) + 1, 3, reason, prepared(1, logprobs), index)


def fmt(chat: bool) -> _Format:
    return _Format("id-1", 1700000000, PERSONAL, chat, CODEC)


def test_a_chat_response_has_the_openai_shape() -> None:
    out = fmt(True).response([completion("Hi", reason="stop"), completion("Yo!", reason="length", index=1)])
    assert json.loads(json.dumps(out)) == out  # plain JSON
    assert {k: out[k] for k in ("id", "object", "created", "model")} == {
        "id": "id-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": PERSONAL,
    }
    assert out["choices"] == [
        {"index": 0, "finish_reason": "stop", "logprobs": None, "message": {"role": "assistant", "content": "Hi"}},
        {"index": 1, "finish_reason": "length", "logprobs": None, "message": {"role": "assistant", "content": "Yo!"}},
    ]
    # The prompt counts once, every row's generated tokens count.
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3 + 4, "total_tokens": 10}


def test_a_text_response_has_the_openai_shape_and_a_cancelled_row_stops() -> None:
    out = fmt(False).response([completion("ok", reason="cancelled")])
    assert out["object"] == "text_completion"
    assert out["choices"] == [{"index": 0, "finish_reason": "stop", "logprobs": None, "text": "ok"}]


def test_chat_logprobs_are_content_entries_with_bytes_and_top_logprobs() -> None:
    top = (TokenLogprob(ord("h"), -0.25), TokenLogprob(ord("H"), -2.0))
    tokens = [TokenOut(ord("h"), 0, -0.25, top), token("!", 1)]
    done = Completion("h!", tokens, 2, 3, "stop", prepared(1, 2), 0)
    (choice,) = fmt(True).response([done])["choices"]
    assert choice["logprobs"] == {
        "content": [
            {
                "token": "h",
                "logprob": -0.25,
                "bytes": [ord("h")],
                "top_logprobs": [
                    {"token": "h", "logprob": -0.25, "bytes": [ord("h")]},
                    {"token": "H", "logprob": -2.0, "bytes": [ord("H")]},
                ],
            },
            {
                "token": "!",
                "logprob": -0.5,
                "bytes": [ord("!")],
                "top_logprobs": [
                    {"token": "!", "logprob": -0.5, "bytes": [ord("!")]},
                    {"token": "?", "logprob": -3.0, "bytes": [ord("?")]},
                ],
            },
        ]
    }


def test_a_token_without_a_logprob_shows_zero() -> None:
    done = Completion("!", [TokenOut(ord("!"), 0, None, ())], 1, 3, "stop", prepared(1, 0), 0)
    (entry,) = fmt(True).response([done])["choices"][0]["logprobs"]["content"]
    assert (entry["logprob"], entry["top_logprobs"]) == (0.0, [])


def test_chat_logprob_bytes_of_a_token_holding_part_of_a_character_are_its_own() -> None:
    first, second = CODEC.ids("é")
    tokens = [TokenOut(first, 0, -0.1, ()), TokenOut(second, 0, -0.1, ())]
    done = Completion("é", tokens, 2, 3, "stop", prepared(1, 0), 0)
    content = fmt(True).response([done])["choices"][0]["logprobs"]["content"]
    assert [e["bytes"] for e in content] == [[first], [second]]  # OpenAI clients join them to rebuild "é"
    assert [e["token"] for e in content] == ["\\xc3", "\\xa9"]  # as OpenAI shows such tokens, never U+FFFD


def test_text_top_logprobs_keep_different_partial_character_tokens_apart() -> None:
    first, second = CODEC.ids("é")
    top = (TokenLogprob(first, -0.1), TokenLogprob(CODEC.ids("€")[0], -0.2))  # both read U+FFFD decoded alone
    tokens = [TokenOut(first, 0, -0.1, top), TokenOut(second, 0, -0.3, ())]
    done = Completion("é", tokens, 2, 3, "stop", prepared(1, 2), 0)
    lp = fmt(False).response([done])["choices"][0]["logprobs"]
    assert lp["tokens"] == ["\\xc3", "\\xa9"]
    assert lp["top_logprobs"][0] == {"\\xc3": -0.1, "\\xe2": -0.2}


def test_text_logprobs_are_parallel_lists_with_offsets() -> None:
    (choice,) = fmt(False).response([completion("ab", logprobs=1)])["choices"]
    assert choice["logprobs"] == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"a": -0.5, "?": -3.0}, {"b": -0.5, "?": -3.0}],
        "text_offset": [0, 1],
    }


def test_text_top_logprobs_always_hold_the_chosen_token() -> None:
    """OpenAI's completions: up to logprobs + 1 entries, the sampled token among them (clients look it up)."""
    (tid,) = CODEC.ids("z")
    sampled = TokenOut(tid, 0, -4.0, (TokenLogprob(ord("?"), -0.1),))  # not among the top 1
    done = Completion("z", [sampled], 2, 3, "stop", prepared(1, 1), 0)
    (choice,) = fmt(False).response([done])["choices"]
    assert choice["logprobs"]["top_logprobs"] == [{"?": -0.1, "z": -4.0}]


async def parts_of(parts: list[Delta | Completion], error: BaseException | None = None) -> AsyncIterator[Any]:
    for part in parts:
        yield part
    if error is not None:
        raise error


def events(f: _Format, parts: AsyncIterator[Any], rows: int, include_usage: bool, logprobs: bool) -> list[str]:
    async def run() -> list[str]:
        return [e async for e in f.events(parts, rows, include_usage, logprobs)]

    return asyncio.run(run())


def payloads(stream: list[str]) -> list[dict[str, Any]]:
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in stream)
    assert stream[-1] == "data: [DONE]\n\n"
    assert stream.count("data: [DONE]\n\n") == 1
    return [json.loads(e.removeprefix("data: ")) for e in stream[:-1]]


def test_a_chat_stream_opens_each_row_sends_deltas_finishes_and_ends_with_done() -> None:
    parts: list[Delta | Completion] = [
        Delta(0, "Hi", []),
        Delta(1, "Yo", []),
        completion("Hi", index=0),
        completion("Yo", reason="length", index=1),
    ]
    out = payloads(events(fmt(True), parts_of(parts), 2, False, False))
    assert {o["object"] for o in out} == {"chat.completion.chunk"}
    assert {o["id"] for o in out} == {"id-1"}
    choices = [o["choices"] for o in out]
    assert choices == [
        [{"index": 0, "finish_reason": None, "logprobs": None, "delta": {"role": "assistant", "content": ""}}],
        [{"index": 1, "finish_reason": None, "logprobs": None, "delta": {"role": "assistant", "content": ""}}],
        [{"index": 0, "finish_reason": None, "logprobs": None, "delta": {"content": "Hi"}}],
        [{"index": 1, "finish_reason": None, "logprobs": None, "delta": {"content": "Yo"}}],
        [{"index": 0, "finish_reason": "stop", "logprobs": None, "delta": {}}],
        [{"index": 1, "finish_reason": "length", "logprobs": None, "delta": {}}],
    ]
    assert all("usage" not in o for o in out)  # not asked for


def test_a_text_stream_with_usage_ends_with_a_usage_chunk() -> None:
    parts: list[Delta | Completion] = [Delta(0, "ok", []), completion("ok")]
    out = payloads(events(fmt(False), parts_of(parts), 1, True, False))
    assert [o["choices"] for o in out[:-1]] == [
        [{"index": 0, "finish_reason": None, "logprobs": None, "text": ""}],
        [{"index": 0, "finish_reason": None, "logprobs": None, "text": "ok"}],
        [{"index": 0, "finish_reason": "stop", "logprobs": None, "text": ""}],
    ]
    assert out[-1]["object"] == "text_completion"
    assert out[-1]["choices"] == []
    assert out[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_streamed_logprobs_carry_row_absolute_offsets() -> None:
    parts: list[Delta | Completion] = [
        Delta(0, "ab", [token("a", 0), token("b", 1)]),
        Delta(0, "c", [token("c", 2)]),
        completion("abc", logprobs=1),
    ]
    out = payloads(events(fmt(False), parts_of(parts), 1, False, True))
    assert [o["choices"][0]["logprobs"]["text_offset"] for o in out[1:3]] == [[0, 1], [2]]
    assert out[2]["choices"][0]["logprobs"]["tokens"] == ["c"]
    chat = payloads(events(fmt(True), parts_of(parts[:1]), 1, False, True))
    assert [e["token"] for e in chat[1]["choices"][0]["logprobs"]["content"]] == ["a", "b"]


def test_a_text_less_delta_is_a_chunk_only_for_its_logprobs() -> None:
    eos = TokenOut(FakeCodec.EOS, 2, -0.5, ())
    parts: list[Delta | Completion] = [Delta(0, "ok", [token("o", 0), token("k", 1)]), Delta(0, "", [eos])]
    out = payloads(events(fmt(False), parts_of(parts), 1, False, True))
    assert out[2]["choices"][0]["text"] == ""
    assert out[2]["choices"][0]["logprobs"]["tokens"] == ["<eos>"]
    assert out[2]["choices"][0]["logprobs"]["text_offset"] == [2]
    chat = payloads(events(fmt(True), parts_of(parts), 1, False, True))
    assert chat[2]["choices"][0]["delta"] == {}
    assert [e["token"] for e in chat[2]["choices"][0]["logprobs"]["content"]] == ["<eos>"]
    without = payloads(events(fmt(True), parts_of(parts), 1, False, False))
    assert len(without) == 2  # the opening chunk and "ok": nothing to send for the text-less delta


def test_an_error_after_the_first_byte_is_an_in_band_event_then_done() -> None:
    parts: list[Delta | Completion] = [Delta(0, "par", [])]
    out = payloads(events(fmt(True), parts_of(parts, Timeout("the request took too long")), 1, True, False))
    assert out[1]["choices"][0]["delta"] == {"content": "par"}
    assert out[-1] == {  # OpenAI's error object (type, param) around our code and message
        "error": {"code": "timeout", "message": "the request took too long", "type": "server_error", "param": None}
    }
    assert all("usage" not in o for o in out)  # no usage for a failed stream


def test_an_unexpected_error_is_reported_without_its_details(caplog: pytest.LogCaptureFixture) -> None:
    out = payloads(events(fmt(False), parts_of([], RuntimeError("secret internals")), 1, False, False))
    error = {"code": "generation_failed", "message": "generation failed", "type": "server_error", "param": None}
    assert out[-1] == {"error": error}
    assert "secret internals" not in json.dumps(out)
    assert "stream failed" in caplog.text  # logged for the operator


def test_body_types_share_the_common_parameters() -> None:
    assert issubclass(ChatCompletionIn, CommonParams) and issubclass(CompletionIn, CommonParams)


# --- the entry points, over the real preparation step and a scripted engine ---


def preparer(db: Database, tmp: Path, reply: str, finish: FinishReason = "stop") -> Preparer:
    settings = Settings(data_dir=tmp / "data", adapters_dir=tmp / "adapters", default_max_new_tokens=32)
    engine = FakeEngine(EngineLimits(context_length=512, max_continuation_tokens=16), reply, finish)
    bm25: BM25Cache[UserCorpus] = BM25Cache()
    spec = BaseModelSpec("llama", engine.model_name, "f" * 64, {})
    return Preparer(settings, db.session_factory, bm25, AdapterStore(settings.adapters_dir), spec, CODEC, engine)


def engine_of(p: Preparer) -> FakeEngine:
    assert isinstance(p.engine, FakeEngine)
    return p.engine


def test_chat_prefers_max_completion_tokens_maps_top_logprobs_and_cuts_at_a_stop(db: Database, tmp_path: Path) -> None:
    alice, key = new_user(db, "alice")
    p = preparer(db, tmp_path, "Hello world")
    body = chat_body(max_tokens=9, max_completion_tokens=20, logprobs=True, top_logprobs=2, stop=[" w"])
    out = asyncio.run(chat(p, StreamRegistry(), caller_of(db, key), body))
    (request,) = engine_of(p).requests
    assert request.sampling.max_new_tokens == 20  # max_completion_tokens wins over the older max_tokens
    assert request.sampling.logprobs == 2
    assert request.tenant == alice.storage_key
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello"}
    assert choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == list("Hello")  # the stop string's tokens are cut with it
    assert all(len(e["top_logprobs"]) == 2 for e in content)
    prompt = len(request.prompt_ids)
    assert out["usage"] == {"prompt_tokens": prompt, "completion_tokens": 7, "total_tokens": prompt + 7}
    assert out["id"].startswith("chatcmpl-") and out["model"] == PERSONAL


def test_chat_top_logprobs_without_logprobs_is_refused_and_no_logprobs_asks_for_none(
    db: Database, tmp_path: Path
) -> None:
    # top_logprobs alone was ignored (200, logprobs null); OpenAI and vLLM refuse it, and so does the schema now.
    for logprobs in (None, False):
        with pytest.raises(ValidationError, match="top_logprobs is only allowed when logprobs is true"):
            chat_body(max_tokens=9, top_logprobs=3, logprobs=logprobs)
    _, key = new_user(db, "alice")
    p = preparer(db, tmp_path, "Hi", finish="length")
    out = asyncio.run(chat(p, StreamRegistry(), caller_of(db, key), chat_body(max_tokens=9)))
    (request,) = engine_of(p).requests
    assert (request.sampling.max_new_tokens, request.sampling.logprobs) == (9, None)
    assert out["choices"][0]["logprobs"] is None
    assert out["choices"][0]["finish_reason"] == "length"


def test_a_completion_continues_the_raw_prompt(db: Database, tmp_path: Path) -> None:
    _, key = new_user(db, "alice")
    p = preparer(db, tmp_path, "ce upon")
    body = text_body(prompt=["On"], max_tokens=4, logprobs=0)
    out = asyncio.run(complete(p, StreamRegistry(), caller_of(db, key), body))
    (request,) = engine_of(p).requests
    assert request.prompt_ids == tuple(CODEC.encode_text("On"))  # no context added to a raw completion
    assert request.sampling.logprobs == 0
    (choice,) = out["choices"]
    assert (choice["text"], choice["finish_reason"]) == ("ce u", "length")
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]
    lp = choice["logprobs"]
    assert lp["top_logprobs"] == [{t: x} for t, x in zip(lp["tokens"], lp["token_logprobs"], strict=True)]  # chosen
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"


def test_a_stream_sends_the_reply_in_deltas_then_usage_and_done(db: Database, tmp_path: Path) -> None:
    _, key = new_user(db, "alice")
    p = preparer(db, tmp_path, "Héllo")
    body = chat_body(stream=True, stream_options={"include_usage": True}, n=2, seed=1)

    async def run() -> list[str]:
        stream = await chat(p, StreamRegistry(), caller_of(db, key), body)
        return [e async for e in stream]

    out = payloads(asyncio.run(run()))
    assert len(engine_of(p).requests) == 2
    for row in (0, 1):
        chunks = [o["choices"][0] for o in out if o["choices"] and o["choices"][0]["index"] == row]
        assert "".join(c["delta"].get("content", "") for c in chunks) == "Héllo"
        assert chunks[-1]["finish_reason"] == "stop"
    assert out[-1]["usage"]["completion_tokens"] == 2 * len(CODEC.ids("Héllo"))


def test_refusals_come_before_any_engine_call(db: Database, tmp_path: Path) -> None:
    _, key = new_user(db, "alice")
    caller = caller_of(db, key)
    p = preparer(db, tmp_path, "x")
    for body, error in (
        (chat_body(tools=[{"type": "function"}]), UnsupportedParameter),
        (chat_body(model="gpt-4o"), NotFound),
        (chat_body(model="user:bob"), Forbidden),
        (chat_body(logit_bias={"--1": 1.0}), UnsupportedParameter),
    ):
        with pytest.raises(error):
            asyncio.run(chat(p, StreamRegistry(), caller, body))
    assert engine_of(p).calls == []
