"""A user whose adapter cannot be read (version pruned between lookup and load, damaged files) fails alone:
503 `adapter_unavailable` with Retry-After, while the other rows of the same mixed batch are served."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.adapters.cache import AdapterKey
from service.batching.scheduler import BatchScheduler, GenerationJob
from service.errors import AdapterUnavailable
from service.inference.tokens import encode_prompt
from tests.adapters.test_adapter_api import app_state, greedy, load_base, lora_zip, make_lora, storage_key
from tests.adapters.test_adapter_api import upload as upload_adapter
from tests.conftest import bearer, create_user, running_app


@dataclass
class Setup:
    client: TestClient
    keys: dict[str, str]  # user -> API key: "good" and "broken" have adapters, "plain" has none
    lora: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("adapter_failure")
    base = load_base(tiny_model_path)
    lora = make_lora(base, tmp / "lora", seed=7, r=4, targets=("q_proj", "v_proj"))
    with running_app(tmp, tiny_model_path, adapter_slots=2) as client:
        keys = {user: create_user(client, user) for user in ("good", "broken", "plain")}
        setup = Setup(client, keys, lora)
        _publish(setup, "good")
        yield setup


def _current(setup: Setup, user: str) -> AdapterKey:
    meta = setup.client.get(f"/users/{user}/adapter", headers=bearer(setup.keys[user])).json()
    return AdapterKey(storage_key(setup.client, user), meta["version"], meta["sha256"])


def _publish(setup: Setup, user: str) -> AdapterKey:
    assert upload_adapter(setup.client, user, setup.keys[user], lora_zip(setup.lora)).status_code == 201
    return _current(setup, user)


def _break(client: TestClient, user: str, version: int) -> None:
    """The version's files vanish from disk (as when another replica pruned it) and from the cache tiers."""
    state = app_state(client)
    assert state.cache is not None
    owner = storage_key(client, user)
    state.cache.drop_owner(owner)
    assert state.store.delete_version(owner, version)


def test_broken_adapter_fails_only_its_rows_in_a_mixed_batch(setup: Setup) -> None:
    client, state = setup.client, app_state(setup.client)
    assert state.runtime is not None and state.cache is not None
    good, broken = _current(setup, "good"), _publish(setup, "broken")
    _break(client, "broken", broken.version)
    runtime = state.runtime
    ids = encode_prompt(runtime.loaded.tokenizer, "Tell me about zebras.")
    params = runtime.params(max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    # A scheduler of its own on the app's generator and adapter cache (the app's is idle): all three jobs
    # are queued before it starts, so they are collected as ONE batch.
    scheduler = BatchScheduler(runtime.generator, max_batch=3, window_ms=1000, queue_max=8, adapters=state.cache)
    jobs = [GenerationJob(ids, params, adapter=a, tenant=t) for a, t in ((good, "g"), (broken, "b"), (None, "p"))]
    for job in jobs:
        scheduler.submit_nowait(job)
    scheduler.start()
    try:
        deadline = time.monotonic() + 60
        while any(j.result is None and j.error is None for j in jobs):
            assert time.monotonic() < deadline, "the batch did not finish"
            time.sleep(0.01)
    finally:
        scheduler.stop()
    ok_good, failed, ok_plain = jobs
    assert isinstance(failed.error, AdapterUnavailable) and isinstance(failed.error.__cause__, OSError)
    assert failed.result is None
    for job in (ok_good, ok_plain):
        assert job.error is None and job.result is not None and job.result.token_ids
        assert job.batch_size == 2  # the two healthy rows still ran together
    assert state.cache.pinned() == {}  # nothing of the failed acquire stays pinned


def test_http_answers_503_for_the_broken_user_and_serves_the_others(setup: Setup) -> None:
    client, keys = setup.client, setup.keys
    broken_version = _publish(setup, "broken").version
    _break(client, "broken", broken_version)
    body = greedy("hello there", 4)
    r = client.post("/users/broken/generate", json=body, headers=bearer(keys["broken"]))
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "adapter_unavailable" and r.headers["Retry-After"] == "1"
    assert "Traceback" not in r.text
    for user in ("good", "plain"):
        assert client.post(f"/users/{user}/generate", json=body, headers=bearer(keys[user])).status_code == 200
    chat = {"model": "personal", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = client.post("/v1/chat/completions", json=chat, headers=bearer(keys["broken"]))
    assert r.status_code == 503 and r.json()["code"] == "adapter_unavailable"
    # A new version is published: the next request resolves to it and is served again.
    _publish(setup, "broken")
    r = client.post("/users/broken/generate", json=body, headers=bearer(keys["broken"]))
    assert r.status_code == 200 and r.json()["adapter_version"] == broken_version + 1
