"""Overload behaviour through HTTP (tiny model): bounded queue -> 429/503 with Retry-After (streamed requests
too, before their first byte), per-user fair share, recovery, and cancelled streams free their rows and pins."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import app_state, bearer, builtin_engine, create_user, running_app


@pytest.fixture(scope="module")
def small_queue_app(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[TestClient]:
    with running_app(
        tmp_path_factory.mktemp("bp"),
        tiny_model_path,
        queue_max=32,
        queue_per_user_max=8,
        batch_max_size=8,
        request_timeout_s=60,
    ) as client:
        yield client


def gen(client: TestClient, user: str, key: str, n: int = 24, **extra: object) -> object:
    body = {"prompt": "tell me a story", "max_new_tokens": n, "temperature": 0, "retrieval_k": 0, **extra}
    return client.post(f"/users/{user}/generate", json=body, headers=bearer(key))


def test_burst_of_500_only_200_429_503_then_recovers(small_queue_app: TestClient) -> None:
    client = small_queue_app
    keys = {f"burst{i}": create_user(client, f"burst{i}") for i in range(10)}
    users = list(keys)
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda i: gen(client, users[i % 10], keys[users[i % 10]]), range(500)))
    codes = [a.status_code for a in answers]  # type: ignore[attr-defined]
    assert set(codes) <= {200, 429, 503}, sorted(set(codes))
    assert codes.count(200) >= 8 and (codes.count(429) + codes.count(503)) > 0
    for a in answers:
        if a.status_code != 200:  # type: ignore[attr-defined]
            assert int(a.headers["Retry-After"]) >= 1  # type: ignore[attr-defined]
            assert a.json()["code"] in ("too_many_requests", "unavailable")  # type: ignore[attr-defined]
    start = time.monotonic()
    while gen(client, users[0], keys[users[0]], n=2).status_code != 200:  # type: ignore[attr-defined]
        assert time.monotonic() - start < 5, "did not recover within 5 s"
        time.sleep(0.1)
    assert app_state(client).engine.stats().waiting == 0


def test_one_user_cannot_starve_another(small_queue_app: TestClient) -> None:
    client = small_queue_app
    hog, victim = create_user(client, "hog"), create_user(client, "victim")
    with ThreadPoolExecutor(41) as pool:
        flood = [pool.submit(gen, client, "hog", hog, 24) for _ in range(40)]
        time.sleep(0.05)
        mine = pool.submit(gen, client, "victim", victim, 4)
        victim_status = mine.result().status_code  # type: ignore[attr-defined]
        flood_codes = [f.result().status_code for f in flood]  # type: ignore[attr-defined]
    assert victim_status == 200
    assert flood_codes.count(429) > 0  # the hog hit its own share, not the server's


def test_cancelled_streams_free_rows_and_pins(small_queue_app: TestClient) -> None:
    client = small_queue_app
    keys = {f"s{i}": create_user(client, f"s{i}") for i in range(4)}
    expected = {u: gen(client, u, k, 12).json()["text"] for u, k in keys.items()}  # type: ignore[attr-defined]

    def stream(i: int) -> str | None:
        user = f"s{i % 4}"
        body = {"prompt": "tell me a story", "max_new_tokens": 12, "temperature": 0, "retrieval_k": 0, "stream": True}
        with client.stream("POST", f"/users/{user}/generate", json=body, headers=bearer(keys[user])) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            text = ""
            for line in r.iter_lines():
                if i % 10 == 0 and line.startswith("data:"):
                    return None  # cancel after the first chunk
                if line.startswith("data:") and '"text"' in line and "usage" not in line:
                    text += json.loads(line[5:])["text"]
            return text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, range(100)))
    for i, text in enumerate(results):
        if i % 10 == 0:
            assert text is None
        else:
            assert text == expected[f"s{i % 4}"], (i, text)
    engine = app_state(client).engine
    deadline = time.monotonic() + 5
    while (engine.stats().waiting or engine.stats().slots_pinned) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats().waiting == 0 and engine.stats().slots_pinned == 0


@pytest.mark.parametrize(("full", "status"), [("max_total", 503), ("max_per_tenant", 429)])
def test_a_streamed_request_that_cannot_be_queued_is_a_plain_json_error_with_retry_after(
    tmp_path: Path, tiny_model_path: Path, full: str, status: int
) -> None:
    """As a non-streamed one: the status a client or router can act on (not a 200 then an error event)."""
    with running_app(tmp_path, tiny_model_path) as client:
        # The queue as if full (settings cannot make it hold less than a request's n rows).
        setattr(builtin_engine(client)._waiting, full, 0)
        key = create_user(client, "sia")
        own = {"prompt": "hi", "max_new_tokens": 2, "stream": True}
        openai = {"model": "personal", "prompt": "hi", "max_tokens": 2, "stream": True}
        chat = {"model": "personal", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
        for path, body in (("/users/sia/generate", own), ("/v1/completions", openai), ("/v1/chat/completions", chat)):
            for stream in (True, False):
                r = client.post(path, json={**body, "stream": stream}, headers=bearer(key))
                assert r.status_code == status, (path, stream, r.text)
                assert r.headers["content-type"] == "application/json" and int(r.headers["Retry-After"]) >= 1
