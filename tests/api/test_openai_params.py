"""OpenAI/vLLM request parameters through the official openai client (tiny model, fp32): stop strings, logprobs
(chat and completions formats) against a direct forward, n with seeds, penalties and logit_bias as defined,
ignore_eos / min_tokens, structured output batched with free rows, and refusals of what is not supported."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from service.engine.types import EngineRequest
from service.inference.tokens import encode_prompt
from tests.conftest import ADMIN_KEY, app_state, bearer, create_user, running_app
from tests.models import load_base

PROMPT = "Once upon a time in a small village"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[tuple[TestClient, Any, Any]]:
    with running_app(tmp_path_factory.mktemp("oaip"), tiny_model_path) as client:
        yield client, load_base(tiny_model_path), AutoTokenizer.from_pretrained(tiny_model_path)


def oa(client: TestClient, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def base_name(client: TestClient) -> str:
    name: str = client.get("/v1/models", headers=bearer(ADMIN_KEY)).json()["data"][0]["id"]
    return name


def raw_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_stop_cuts_across_token_boundaries_and_reports_stop(env: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = env
    model = base_name(client)
    free = oa(client).completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0)
    assert free.choices[0].logprobs is not None and free.choices[0].logprobs.tokens is not None
    text, tokens = free.choices[0].text, free.choices[0].logprobs.tokens
    # A stop string made of the end of token 3 and the start of token 4: matched across the boundary.
    head = "".join(tokens[:4])
    stop = head[-2:] + tokens[4][:2]
    assert len(stop) >= 3 and stop in text
    cut = oa(client).completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "zzzq"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = oa(client).completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_chat_logprobs_match_a_direct_forward(env: tuple[TestClient, Any, Any]) -> None:
    client, base, tokenizer = env
    out = oa(client).chat.completions.create(
        model=base_name(client), messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=5,
    )  # fmt: skip
    assert out.choices[0].logprobs is not None and out.usage is not None
    content = out.choices[0].logprobs.content
    assert content is not None and len(content) == out.usage.completion_tokens
    ids = encode_prompt(tokenizer, "hi")  # the chat template, as the preparation step encodes the turn
    chosen = _token_ids(client, [e.token for e in content])
    lp = raw_logprobs(base, ids + chosen)
    for t, (entry, tid) in enumerate(zip(content, chosen, strict=True)):
        assert abs(entry.logprob - float(lp[len(ids) - 1 + t, tid])) < 1e-4
        assert len(entry.top_logprobs) == 5 and entry.top_logprobs[0].token == entry.token  # greedy = top token
        assert entry.bytes == list(entry.token.encode())


def _token_ids(client: TestClient, pieces: list[str]) -> list[int]:
    """The token id of each logprobs entry, from its text (the tiny model's vocabulary maps pieces 1:1)."""
    codec = app_state(client).preparer.codec
    by_text = {codec.token_text(i): i for i in range(codec.vocab_size)}
    return [by_text[p] for p in pieces]


def test_completion_logprobs_format(env: tuple[TestClient, Any, Any]) -> None:
    client, base, tokenizer = env
    out = oa(client).completions.create(model=base_name(client), prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == out.choices[0].text
    ids = [int(i) for i in tokenizer(PROMPT)["input_ids"]]
    gen = _token_ids(client, lp.tokens)
    full = raw_logprobs(base, ids + gen)
    for t, value in enumerate(lp.token_logprobs):
        assert value is not None and abs(value - float(full[len(ids) - 1 + t, gen[t]])) < 1e-4


def test_n_choices_reproducible_with_a_seed(env: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = env
    args: dict[str, Any] = {"model": base_name(client), "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0}
    first = oa(client).completions.create(n=3, seed=7, **args)
    again = oa(client).completions.create(n=3, seed=7, **args)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # rows are sampled independently (seed, seed+1, seed+2)
    assert first.usage is not None and first.usage.completion_tokens == 30
    streamed = list(oa(client).completions.create(n=3, seed=7, stream=True, **args))
    for i in range(3):
        assert (
            "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i)
            == first.choices[i].text
        )


@pytest.mark.parametrize("kind", ["presence", "frequency", "bias"])
def test_penalties_and_logit_bias_as_defined(env: tuple[TestClient, Any, Any], kind: str) -> None:
    """Greedy with a penalty: every chosen token is the argmax of the raw logits minus the penalty of the
    tokens already generated (presence: 1.5 once; frequency: 1.5 per occurrence); logit_bias adds to one token."""
    client, base, tokenizer = env
    options: dict[str, dict[str, Any]] = {
        "presence": {"presence_penalty": 1.5},
        "frequency": {"frequency_penalty": 1.5},
        "bias": {"logit_bias": {"42": 100.0}},
    }
    extra = options[kind]
    out = oa(client).completions.create(
        model=base_name(client), prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0, **extra
    )
    ids = [int(i) for i in tokenizer(PROMPT)["input_ids"]]
    assert out.choices[0].logprobs is not None and out.choices[0].logprobs.tokens is not None
    chosen = _token_ids(client, out.choices[0].logprobs.tokens)
    plain = oa(client).completions.create(model=base_name(client), prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text != plain.choices[0].text  # the option changes the output
    for t, token in enumerate(chosen):
        logits = raw_logprobs(base, ids + chosen[:t])[-1].clone()  # log-softmax shifts all logits alike
        counts: dict[int, int] = {}
        for prev in chosen[:t]:
            counts[prev] = counts.get(prev, 0) + 1
        for prev, c in counts.items():
            logits[prev] -= 1.5 if kind == "presence" else (1.5 * c if kind == "frequency" else 0.0)
        if kind == "bias":
            logits[42] += 100.0
        assert int(logits.argmax()) == token, (kind, t)


def test_ignore_eos_and_min_tokens(env: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = env
    args: dict[str, Any] = {"model": base_name(client), "prompt": PROMPT, "temperature": 0}
    full = oa(client).completions.create(max_tokens=40, extra_body={"ignore_eos": True}, **args)
    assert full.usage is not None and full.usage.completion_tokens == 40 and full.choices[0].finish_reason == "length"
    long = oa(client).completions.create(max_tokens=30, extra_body={"min_tokens": 25}, **args)
    assert long.usage is not None and long.usage.completion_tokens >= 25


# Bounded, so that even a random tiny model must close every string and array within the token budget.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def valid(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and set(doc) <= {"name", "age", "tags"}
        and isinstance(doc.get("name"), str)
        and len(doc["name"]) <= 6
        and isinstance(doc.get("age"), int)
        and 0 <= doc["age"] <= 120
        and len(doc.get("tags", [])) <= 2
        and all(isinstance(t, str) and len(t) <= 4 for t in doc.get("tags", []))
    )


def test_constrained_and_free_rows_batch_together_with_their_solo_tokens(env: tuple[TestClient, Any, Any]) -> None:
    """JSON-schema rows and free rows in the same engine steps: each row's tokens equal its solo run."""
    client, _, _ = env
    state = app_state(client)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    bodies: list[dict[str, Any]] = [
        {"model": base_name(client), "prompt": f"Person {i}:", "max_tokens": 48, "temperature": 0,
         **({"response_format": fmt} if i % 2 == 0 else {})}
        for i in range(6)
    ]  # fmt: skip
    solo = [
        client.post("/v1/completions", json=b, headers=bearer(ADMIN_KEY)).json()["choices"][0]["text"] for b in bodies
    ]
    steps: list[int] = []
    engine = state.engine
    original = engine.stream

    def counting(request: EngineRequest) -> Any:
        steps.append(1)
        return original(request)

    async def together() -> list[str]:
        import httpx

        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            rs = await asyncio.gather(
                *(http.post("/v1/completions", json=b, headers=bearer(ADMIN_KEY)) for b in bodies)
            )
        return [r.json()["choices"][0]["text"] for r in rs]

    engine.stream = counting  # type: ignore[method-assign]
    try:
        batched = asyncio.run(together())
    finally:
        del engine.stream
    assert batched == solo and len(steps) == 6
    for i in range(0, 6, 2):  # even a random tiny model writes schema-valid JSON under the mask
        assert valid(json.loads(solo[i])), solo[i]


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"best_of": 2}, "best_of"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_an_unsupported_parameter_is_a_400_naming_it(
    env: tuple[TestClient, Any, Any], extra: dict[str, Any], name: str
) -> None:
    client, _, _ = env
    key = create_user(client, f"unsup-{name}")
    for path, body in (
        ("/v1/chat/completions", {"model": "personal", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "personal", "prompt": "hi"}),
    ):
        r = client.post(path, json={**body, **extra}, headers=bearer(key))
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "unsupported_parameter" and name in r.json()["message"]
    msg = {"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}
    r = client.post("/v1/chat/completions", json={"model": "personal", "messages": [msg]}, headers=bearer(key))
    assert r.status_code == 400 and "tool_calls" in r.json()["message"]


def test_generate_route_takes_stop_logprobs_and_response_format(env: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = env
    key = create_user(client, "gen-opts")
    body: dict[str, Any] = {"prompt": "Tell me a story", "max_new_tokens": 20, "temperature": 0, "retrieval_k": 0}
    free = client.post("/users/gen-opts/generate", json={**body, "logprobs": 2}, headers=bearer(key)).json()
    assert len(free["logprobs"]) == free["usage"]["completion_tokens"] and len(free["logprobs"][0]["top_logprobs"]) == 2
    stop = free["text"][5:8]
    cut = client.post("/users/gen-opts/generate", json={**body, "stop": [stop]}, headers=bearer(key)).json()
    assert cut["text"] == free["text"][: free["text"].index(stop)] and cut["finish_reason"] == "stop"
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    r = client.post(
        "/users/gen-opts/generate", json={**body, "max_new_tokens": 64, "response_format": fmt}, headers=bearer(key)
    )
    assert r.status_code == 200
    text = r.json()["text"]
    if r.json()["finish_reason"] == "stop":
        assert valid(json.loads(text)), text
    broken = {"type": "json_schema", "json_schema": {"schema": 3}}
    bad = client.post("/users/gen-opts/generate", json={**body, "response_format": broken}, headers=bearer(key))
    assert bad.status_code == 400


def test_a_json_schema_beside_another_type_is_refused_not_dropped(env: tuple[TestClient, Any, Any]) -> None:
    """{"type": "json_object", "json_schema": {...}} answered 200 with text not held to the schema."""
    client, _, _ = env
    key = create_user(client, "fmt-mix")
    schema = {"name": "p", "schema": SCHEMA}
    for kind in ("json_object", "text"):
        fmt = {"type": kind, "json_schema": schema}
        body = {"model": "personal", "messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
        r = client.post("/v1/chat/completions", json={**body, "max_tokens": 2}, headers=bearer(key))
        assert r.status_code == 422 and "use type 'json_schema'" in r.text, r.text
        gen = {"prompt": "hi", "max_new_tokens": 2, "response_format": fmt}
        assert client.post("/users/fmt-mix/generate", json=gen, headers=bearer(key)).status_code == 422


def test_top_logprobs_without_logprobs_is_refused_not_ignored(env: tuple[TestClient, Any, Any]) -> None:
    """It answered 200 with `logprobs: null` (OpenAI and vLLM refuse it); a validation error here, as every other."""
    client, _, _ = env
    key = create_user(client, "toplp")
    body = {"model": "personal", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_logprobs": 3}
    r = client.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert r.status_code == 422 and "top_logprobs is only allowed when logprobs is true" in r.text, r.text
    r = client.post("/v1/chat/completions", json={**body, "logprobs": True}, headers=bearer(key))
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3


def test_an_expensive_schema_for_eight_rows_is_refused_at_once(env: tuple[TestClient, Any, Any]) -> None:
    """41 bytes of schema: its lexer cost 61 s and 2.6 GB, paid again for each of the n rows, while the other
    users' rows waited for the threads that built them (an 8-token request of another user took 56 s)."""
    client, _, _ = env
    key = create_user(client, "bomb")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 4_999_999}}}
    body = {"model": "personal", "messages": [{"role": "user", "content": "hi"}], "n": 8, "response_format": fmt}
    started = time.monotonic()
    r = client.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert r.status_code == 400 and "multipleOf" in r.json()["error"]["message"], r.text
    assert time.monotonic() - started < 5
