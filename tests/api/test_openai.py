"""The official openai client against /v1 (tiny model): models, chat, completions, streaming, tenancy."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_KEY, bearer, create_user


def client_for(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def test_openai_client_roundtrip(sqlite_client: TestClient) -> None:
    key = create_user(sqlite_client, "oa-user")
    sqlite_client.post(
        "/users/oa-user/history", json={"items": [{"id": "x", "output": "secret-canary-77"}]}, headers=bearer(key)
    )
    oa = client_for(sqlite_client, key)
    ids = [m.id for m in oa.models.list().data]
    assert ids[0] == "personal" and len(ids) == 2
    base = ids[1]
    chat = oa.chat.completions.create(
        model="personal", messages=[{"role": "user", "content": "say hi"}], max_tokens=5, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and 1 <= chat.usage.completion_tokens <= 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    # streaming gives the same greedy text as the plain call
    parts = oa.chat.completions.create(
        model="personal",
        messages=[{"role": "user", "content": "say hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(parts)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    done = oa.completions.create(model=base, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert done.object == "text_completion" and done.usage is not None and done.usage.completion_tokens <= 4
    # another user's adapter by name: 403, as on every route; the caller's own by name is `personal`
    with pytest.raises(openai.PermissionDeniedError):
        oa.chat.completions.create(model="user:someone-else", messages=[{"role": "user", "content": "x"}])
    own = oa.chat.completions.create(
        model="user:oa-user", messages=[{"role": "user", "content": "say hi"}], max_tokens=5, temperature=0
    )
    assert own.choices[0].message.content == chat.choices[0].message.content


def test_openai_tenancy(sqlite_client: TestClient) -> None:
    create_user(sqlite_client, "oa-a")
    create_user(sqlite_client, "oa-b")
    admin = client_for(sqlite_client, ADMIN_KEY)
    out = admin.chat.completions.create(
        model="user:oa-a", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert out.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        client_for(sqlite_client, "garbage").models.list()
    with pytest.raises(openai.NotFoundError):  # 'personal' means nothing for the admin
        admin.chat.completions.create(model="personal", messages=[{"role": "user", "content": "hi"}])


def test_errors_on_v1_carry_openais_error_object_and_keep_the_own_fields(sqlite_client: TestClient) -> None:
    """OpenAI SDKs and clients read `error.message`/`error.type`/`error.param`; the body keeps `code`, `message`,
    `details` (the project's contract) beside it. Other routes are unchanged."""
    key = create_user(sqlite_client, "oa-err")
    oa = client_for(sqlite_client, key)
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        oa.chat.completions.create(model="personal", messages=[{"role": "user", "content": "x"}], temperature=5)
    body = bad.value.response.json()
    assert body["error"] == {
        "message": "request validation failed",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "invalid_request",
    }
    assert body["code"] == "invalid_request" and body["details"][0]["loc"] == ["body", "temperature"]
    assert bad.value.param == "temperature"  # what the SDK shows the caller
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        oa.chat.completions.create(model="user:someone-else", messages=[{"role": "user", "content": "x"}])
    assert forbidden.value.response.json()["error"]["type"] == "permission_error"
    unauthenticated = sqlite_client.get("/v1/models", headers=bearer("wrong"))
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["type"] == "authentication_error"
    elsewhere = sqlite_client.get("/users/oa-err/history", headers=bearer("wrong"))
    assert elsewhere.status_code == 401 and "error" not in elsewhere.json()
