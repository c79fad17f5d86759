"""Logprobs name each token by its own bytes, and streamed logprobs are the non-streamed ones: the tiny model with
the real byte-level tokenizer over /v1 (logit_bias forces the tokens: partial characters, special tokens)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_KEY, bearer, running_app

EMOJI_HEAD = 10813  # "ðŁ": the bytes F0 9F that start many emoji, never a character on its own
IM_END = 2  # <|im_end|>, a special token that decodes to no text


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[TestClient]:
    with running_app(tmp_path_factory.mktemp("lptok"), tiny_model_path) as c:
        yield c


def post(client: TestClient, route: str, body: dict[str, Any]) -> Any:
    model = client.get("/v1/models", headers=bearer(ADMIN_KEY)).json()["data"][0]["id"]
    r = client.post(f"/v1/{route}", json={"model": model, **body}, headers=bearer(ADMIN_KEY))
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return r.json()
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def forced(token: int, n: int = 4, **extra: Any) -> dict[str, Any]:
    return {"max_tokens": n, "temperature": 0, "ignore_eos": True, "logit_bias": {str(token): 100}, **extra}


def test_a_partial_character_token_shows_its_own_bytes_in_chat_logprobs(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    out = post(client, "chat/completions", {"messages": messages, **forced(EMOJI_HEAD, logprobs=True, top_logprobs=2)})
    content = out["choices"][0]["logprobs"]["content"]
    assert [(e["token"], e["bytes"]) for e in content] == [("\\xf0\\x9f", [0xF0, 0x9F])] * 4
    for e in content:  # the alternatives too: their bytes join back to their text
        assert all(bytes(t["bytes"]).decode("utf-8", "backslashreplace") == t["token"] for t in e["top_logprobs"])


def test_text_offsets_follow_the_decoded_text_and_partial_tokens_stay_apart(client: TestClient) -> None:
    out = post(client, "completions", {"prompt": "hi", **forced(EMOJI_HEAD, logprobs=3)})
    (choice,) = out["choices"]
    assert choice["text"] == "\ufffd" * 4  # four cut-off characters
    lp = choice["logprobs"]
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert lp["tokens"] == ["\\xf0\\x9f"] * 4
    assert all(len(top) >= 3 for top in lp["top_logprobs"])  # different tokens never merge into one key


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_streamed_logprobs_hold_trailing_tokens_without_text(client: TestClient, route: str) -> None:
    chat = route == "chat/completions"
    prompt: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    body = {**prompt, **forced(IM_END, **({"logprobs": True, "top_logprobs": 1} if chat else {"logprobs": 0}))}
    whole = post(client, route, body)["choices"][0]["logprobs"]
    chunks = post(client, route, {**body, "stream": True})
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    if chat:
        streamed: Any = [e for p in parts for e in p["content"]]
        assert streamed == whole["content"] and len(streamed) == 4
    else:
        streamed = {k: [x for p in parts for x in p[k]] for k in whole}
        assert streamed == whole and whole["tokens"] == ["<|im_end|>"] * 4
