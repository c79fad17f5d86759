"""A user whose adapter cannot be read (version pruned between lookup and load, damaged files) fails alone:
503 `adapter_unavailable` with Retry-After, while the other users are served (the engine-level case, rows
in the same steps, is tests/engine/test_builtin.py::test_an_unreadable_adapter_fails_only_its_rows)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import app_state, bearer, builtin_engine, create_user, running_app
from tests.factories import greedy, lora_zip, make_lora, storage_key
from tests.factories import upload as upload_adapter
from tests.models import load_base


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


def _publish(setup: Setup, user: str) -> int:
    r = upload_adapter(setup.client, user, setup.keys[user], lora_zip(setup.lora))
    assert r.status_code == 201
    version: int = r.json()["version"]
    return version


def _break(client: TestClient, user: str, version: int) -> None:
    """The version's files vanish from disk (as when another replica pruned it) and from the cache tiers."""
    owner = storage_key(client, user)
    builtin_engine(client).cache.drop_owner(owner)
    assert app_state(client).store.delete_version(owner, version)


def test_http_answers_503_for_the_broken_user_and_serves_the_others(setup: Setup) -> None:
    client, keys = setup.client, setup.keys
    broken_version = _publish(setup, "broken")
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
