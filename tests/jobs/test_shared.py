"""Shared task LoRA: trained from all users, merged into the served base, user adapters flagged stale
and bulk-retrained on top of it (tiny model, in-process runner)."""

from __future__ import annotations

import time

import torch
from fastapi.testclient import TestClient

from service.adapters.peft_format import base_linear
from tests.conftest import admin_headers, bearer, builtin_engine, create_user
from tests.jobs.test_jobs_api import add_history, wait_job


def test_shared_retrain_merges_and_flags_stale(client: TestClient) -> None:
    key = create_user(client, "sam")
    add_history(client, "sam", key, n=4)
    create_user(client, "tia")
    before = client.post(
        "/users/tia/generate",
        json={"prompt": "hello there", "max_new_tokens": 6, "temperature": 0, "retrieval_k": 0},
        headers=admin_headers(),
    ).json()["text"]
    assert (
        wait_job(client, client.post("/admin/users/sam/retrain", headers=admin_headers()).json()["job_id"])["status"]
        == "succeeded"
    )
    assert client.get("/users/sam/adapter", headers=bearer(key)).json()["stale"] is False

    job = client.post("/admin/shared-adapter/retrain", headers=admin_headers()).json()
    assert wait_job(client, job["job_id"])["status"] == "succeeded"
    engine = builtin_engine(client)
    # The next request notices the new shared version; the engine merges it before that request runs.
    deadline = time.monotonic() + 10
    while engine.applied_shared[0] != 1:
        client.post("/users/tia/generate", json={"prompt": "x", "max_new_tokens": 1}, headers=admin_headers())
        assert time.monotonic() < deadline
    originals = engine.applied_shared[1]
    assert originals, "the shared LoRA touched no weight"
    path, original = next(iter(originals.items()))
    assert not torch.equal(base_linear(engine.model, path).weight, original)  # merged into the base
    after = client.post(
        "/users/tia/generate",
        json={"prompt": "hello there", "max_new_tokens": 6, "temperature": 0, "retrieval_k": 0},
        headers=admin_headers(),
    )
    assert after.status_code == 200 and isinstance(before, str)

    assert client.get("/users/sam/adapter", headers=bearer(key)).json()["stale"] is True
    bulk = client.post("/admin/adapters/retrain-stale", headers=admin_headers())
    assert bulk.status_code == 202 and len(bulk.json()["jobs"]) == 1
    assert wait_job(client, bulk.json()["jobs"][0]["job_id"])["status"] == "succeeded"
    meta = client.get("/users/sam/adapter", headers=bearer(key)).json()
    assert meta["version"] == 2 and meta["shared_version"] == 1 and meta["stale"] is False
