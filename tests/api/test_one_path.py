"""Every generating route goes through the one preparation step: the shared LoRA reaches a replica that
serves only /v1, a user has one fair-queue share whatever the route, and /v1/completions puts the retrieved
items it asks for into the prompt."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service import composition
from service.accounts import repository as accounts
from service.adapters import service as adapter_service
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec
from service.db.models import SHARED_OWNER
from service.db.session import unit_of_work
from service.engine.types import EngineEvent, EngineRequest
from tests.conftest import ADMIN_KEY, app_state, bearer, builtin_engine, create_user, make_settings, running_app
from tests.factories import PromptRecorder, make_lora, peft_files
from tests.models import load_base


def chat(client: TestClient, key: str, model: str, text: str = "Tell me about zebras.") -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def publish_shared(tmp: Path, db_url: str, model: Path, lora: Path) -> int:
    """A worker's commit of a new shared task LoRA, from outside the replica (no message reaches it)."""
    settings = make_settings(tmp, db_url, str(model))
    base = load_base(model)
    db = composition.database(settings)  # the worker's: its sessions and store seal
    ctx = composition.adapter_context(
        settings,
        AdapterStore(settings.adapters_dir, composition.sealer_of(db)),
        BaseModelSpec.from_model(base, model.name),
    )
    with unit_of_work(db.session_factory) as session:
        row = adapter_service.publish(session, ctx, SHARED_OWNER, None, peft_files(lora), source="trained")
        version = row.version
    db.dispose()
    return version


def test_a_v1_only_replica_serves_the_new_shared_version(tmp_path: Path, tiny_model_path: Path) -> None:
    lora = make_lora(load_base(tiny_model_path), tmp_path / "shared", seed=3, r=8, targets=("q_proj", "v_proj"))
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    with running_app(tmp_path, tiny_model_path, db=_migrated(db)) as replica:
        base_name = replica.get("/v1/models", headers=bearer(ADMIN_KEY)).json()["data"][0]["id"]
        before = chat(replica, ADMIN_KEY, base_name)
        version = publish_shared(tmp_path, db, tiny_model_path, lora)
        after = chat(replica, ADMIN_KEY, base_name)  # the first /v1 request after the commit
        assert builtin_engine(replica).shared_version == version
    with running_app(tmp_path, tiny_model_path, db=db) as fresh:  # starts with the shared LoRA merged
        expected = chat(fresh, ADMIN_KEY, base_name)
    assert after == expected and after != before


def _migrated(db: str) -> str:
    from service.db.migrate import upgrade

    upgrade(db)
    return db


class TenantRecorder:
    """Records the tenant of every request the engine receives."""

    def __init__(self, client: TestClient) -> None:
        self.engine = app_state(client).engine
        self.tenants: list[str] = []
        self._original = self.engine.stream

    def __enter__(self) -> TenantRecorder:
        def stream(request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
            self.tenants.append(request.tenant)
            return self._original(request)

        self.engine.stream = stream  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.stream


def test_one_queue_share_per_user_whatever_the_route(sqlite_client: TestClient) -> None:
    client = sqlite_client
    key = create_user(client, "share-user")
    base_name = client.get("/v1/models", headers=bearer(key)).json()["data"][1]["id"]
    with TenantRecorder(client) as rec:
        gen = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0}
        assert client.post("/users/share-user/generate", json=gen, headers=bearer(key)).status_code == 200
        chat(client, key, "personal")
        chat(client, key, base_name)
        body = {"model": "personal", "prompt": "Once", "max_tokens": 2, "temperature": 0}
        assert client.post("/v1/completions", json=body, headers=bearer(key)).status_code == 200
        chat(client, ADMIN_KEY, "user:share-user")
    with unit_of_work(app_state(client).session_factory) as session:
        user = accounts.by_user_id(session, "share-user")
        assert user is not None
        storage_key = user.storage_key
    assert rec.tenants == [storage_key] * 5  # one share (the storage key, never the public id) for every route


def test_v1_completions_with_retrieval_puts_the_items_in_the_prompt(sqlite_client: TestClient) -> None:
    client = sqlite_client
    key = create_user(client, "rag-user")
    item = {"id": "z1", "input": "zebras", "output": "stripes-canary-314"}
    assert client.post("/users/rag-user/history", json={"items": [item]}, headers=bearer(key)).status_code == 201
    body: dict[str, Any] = {"model": "personal", "prompt": "zebras are", "max_tokens": 2, "temperature": 0}
    with PromptRecorder(client) as rec:
        assert client.post("/v1/completions", json=body, headers=bearer(key)).status_code == 200
        assert client.post("/v1/completions", json={**body, "retrieval_k": 1}, headers=bearer(key)).status_code == 200
    plain, augmented = rec.prompts
    assert "stripes-canary-314" not in plain and plain == "zebras are"  # a raw completion stays raw by default
    assert "stripes-canary-314" in augmented and augmented.endswith("zebras are")
