"""Server-Sent Events from POST /users/{id}/generate with "stream": true (acceptance 6): the streamed text
equals the non-streamed greedy text, the final event carries usage and adapter_version, and a client
that goes away early leaves no adapter pinned."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import bearer, builtin_engine, create_user, running_app
from tests.factories import greedy, lora_zip, make_lora, upload
from tests.models import load_base

KEYS: dict[str, str] = {}  # user -> API key, filled by the module's app fixture


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("stream")
    lora = make_lora(load_base(tiny_model_path), tmp / "lora", seed=7, r=8, targets=("q_proj", "v_proj", "up_proj"))
    with running_app(tmp, tiny_model_path) as c:
        KEYS.update({user: create_user(c, user) for user in ("plain", "tuned")})
        assert upload(c, "tuned", KEYS["tuned"], lora_zip(lora)).status_code == 201
        yield c
    KEYS.clear()


def _events(lines: Iterator[str]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) for each SSE event; the default event name is "message"."""
    out: list[tuple[str, dict[str, Any]]] = []
    name, data = "message", None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
        elif line == "" and data is not None:
            out.append((name, data))
            name, data = "message", None
    if data is not None:
        out.append((name, data))
    return out


@pytest.mark.parametrize(("user", "version"), [("plain", None), ("tuned", 1)])
def test_stream_equals_non_streamed_greedy(client: TestClient, user: str, version: int | None) -> None:
    body = greedy("Tell me about zebras.", 24)
    headers = bearer(KEYS[user])
    plain = client.post(f"/users/{user}/generate", json=body, headers=headers)
    assert plain.status_code == 200, plain.text
    expected = plain.json()
    with client.stream("POST", f"/users/{user}/generate", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.iter_lines())
    deltas = [data["text"] for name, data in events if name == "message"]
    assert len(deltas) > 1  # tokens arrive as they are produced, not in one piece
    assert "".join(deltas) == expected["text"]
    assert [name for name, _ in events][-1] == "done" and sum(name == "done" for name, _ in events) == 1
    done = events[-1][1]
    assert done["adapter_version"] == version == expected["adapter_version"]
    assert done["usage"] == expected["usage"] and done["usage"]["completion_tokens"] > 0
    assert done["text"] == expected["text"] and done["finish_reason"] == expected["finish_reason"]


def test_stream_errors_before_streaming_are_plain_json(client: TestClient) -> None:
    body = {**greedy("hi", 10_000), "stream": True}
    r = client.post("/users/plain/generate", json=body, headers=bearer(KEYS["plain"]))
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")


def test_client_closing_early_leaves_nothing_pinned(client: TestClient) -> None:
    cache = builtin_engine(client).cache
    body = {**greedy("Tell me a very long story.", 512), "stream": True}
    headers = bearer(KEYS["tuned"])
    started = time.monotonic()
    with client.stream("POST", "/users/tuned/generate", json=body, headers=headers) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        assert cache.pinned() != {}  # the row is in flight with its adapter pinned
    deadline = time.monotonic() + 10
    while cache.pinned() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.pinned() == {}
    # The row was cancelled, not run to its 512 tokens: the next request is served right away.
    r2 = client.post("/users/tuned/generate", json=greedy("hi", 4), headers=headers)
    assert r2.status_code == 200 and r2.json()["adapter_version"] == 1
    assert time.monotonic() - started < 10
