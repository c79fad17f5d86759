"""Shared task LoRA: trained from all users, merged into the served base, user adapters flagged stale
and bulk-retrained on top of it (tiny model, in-process runner)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from service.accounts import repository as accounts
from service.adapters.peft_format import base_linear
from service.db.models import SHARED_OWNER
from service.db.session import unit_of_work
from service.jobs import repository as jobs_repo
from tests.conftest import admin_headers, app_state, bearer, builtin_engine, create_user, running_app
from tests.factories import add_history, wait_job


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


def test_erasing_a_contributor_flags_the_shared_versions_trained_on_them(client: TestClient) -> None:
    keys = {u: create_user(client, u) for u in ("ann", "ben")}
    for user, key in keys.items():
        add_history(client, user, key, n=3)
    job = client.post("/admin/shared-adapter/retrain", headers=admin_headers()).json()
    assert wait_job(client, job["job_id"])["status"] == "succeeded"
    versions = client.get("/admin/shared-adapter", headers=admin_headers()).json()["versions"]
    assert [(v["version"], v["trained_on_erased"]) for v in versions] == [(1, False)]
    gen = {"prompt": "x", "max_new_tokens": 1, "retrieval_k": 3}
    assert client.post("/users/ben/generate", json=gen, headers=bearer(keys["ben"])).status_code == 200
    state = app_state(client)
    with unit_of_work(state.session_factory) as session:
        ben = accounts.by_user_id(session, "ben")
        assert ben is not None
        ben_key = ben.storage_key
    assert ben_key in state.bm25._entries  # indexed while in use
    assert client.delete("/users/ben", headers=bearer(keys["ben"])).status_code == 204
    versions = client.get("/admin/shared-adapter", headers=admin_headers()).json()["versions"]
    assert [(v["version"], v["trained_on_erased"]) for v in versions] == [(1, True)]
    assert ben_key not in state.bm25._entries  # dropped after the commit, on the erase notice
    job = client.post("/admin/shared-adapter/retrain", headers=admin_headers()).json()
    assert wait_job(client, job["job_id"])["status"] == "succeeded"
    versions = client.get("/admin/shared-adapter", headers=admin_headers()).json()["versions"]
    assert [(v["version"], v["trained_on_erased"]) for v in versions] == [(2, False), (1, True)]


def test_a_users_index_survives_their_adapter_changes(client: TestClient) -> None:
    # It used to be dropped on every adapter notice: each upload or delete cost a rebuild from the whole history.
    key = create_user(client, "cal")
    add_history(client, "cal", key, n=3)
    gen = {"prompt": "x", "max_new_tokens": 1, "retrieval_k": 3}
    assert client.post("/users/cal/generate", json=gen, headers=bearer(key)).status_code == 200
    state = app_state(client)
    with unit_of_work(state.session_factory) as session:
        cal = accounts.by_user_id(session, "cal")
        assert cal is not None
        cal_key = cal.storage_key
    index = state.bm25._entries[cal_key]
    job = client.post("/admin/users/cal/retrain", headers=admin_headers()).json()
    assert wait_job(client, job["job_id"])["status"] == "succeeded"
    assert client.delete("/users/cal/adapter", headers=bearer(key)).status_code == 204
    assert state.bm25._entries[cal_key] is index
    assert client.post("/users/cal/generate", json=gen, headers=bearer(key)).status_code == 200


# --- OPPU_SHARED_ON_ERASE: the shared LoRA trained on an erased user is taken out of service (and retrained) ---


def _shared(client: TestClient) -> tuple[int | None, list[tuple[int, bool]]]:
    body = client.get("/admin/shared-adapter", headers=admin_headers()).json()
    return body["current_version"], [(v["version"], v["trained_on_erased"]) for v in body["versions"]]


def _retrain_shared(client: TestClient) -> None:
    job = client.post("/admin/shared-adapter/retrain", headers=admin_headers()).json()
    assert wait_job(client, job["job_id"])["status"] == "succeeded"


def _two_shared_versions(client: TestClient) -> dict[str, str]:
    """v1 trained on cleo alone, v2 on cleo and dora."""
    keys = {"cleo": create_user(client, "cleo")}
    add_history(client, "cleo", keys["cleo"], n=3)
    _retrain_shared(client)
    keys["dora"] = create_user(client, "dora")
    add_history(client, "dora", keys["dora"], n=3)
    _retrain_shared(client)
    assert _shared(client) == (2, [(2, False), (1, False)])
    return keys


def test_erasing_a_contributor_retires_the_shared_version_they_trained(client: TestClient) -> None:
    """retire (the default): at the erase's commit the newest kept version not trained on an erased user is
    served (requests read it from SQL; the engine takes it on the notice); none once every version is."""
    keys = _two_shared_versions(client)
    engine = builtin_engine(client)
    assert client.delete("/users/dora", headers=bearer(keys["dora"])).status_code == 204
    assert _shared(client) == (1, [(2, True), (1, False)])
    assert engine.shared_version == 1  # the erase's notice, applied on this replica before the 204
    gen = {"prompt": "x", "max_new_tokens": 1}
    assert client.post("/users/cleo/generate", json=gen, headers=bearer(keys["cleo"])).status_code == 200
    assert engine.applied_shared[0] == 1
    assert client.delete("/users/cleo", headers=bearer(keys["cleo"])).status_code == 204
    assert _shared(client) == (None, [(2, True), (1, True)])
    assert engine.shared_version is None
    with unit_of_work(app_state(client).session_factory) as session:
        assert jobs_repo.active(session, SHARED_OWNER) is None  # retire asks for no retrain
    create_user(client, "eli")
    assert client.post("/users/eli/generate", json=gen, headers=admin_headers()).status_code == 200
    assert engine.applied_shared == (None, {})  # the base model alone: nothing of an erased user is served


def test_retrain_policy_retires_then_trains_a_new_shared_version(
    tmp_path: Path, tiny_model_path: Path, db_url: str
) -> None:
    with running_app(tmp_path, tiny_model_path, db_url, shared_on_erase="retrain") as client:
        keys = _two_shared_versions(client)
        assert client.delete("/users/dora", headers=bearer(keys["dora"])).status_code == 204
        current, _ = _shared(client)
        assert current in (1, 3)  # retired to v1 at once; v3 once the queued retrain has run
        deadline = time.monotonic() + 180
        while _shared(client)[0] != 3:
            assert time.monotonic() < deadline, _shared(client)
            time.sleep(0.5)
        assert _shared(client) == (3, [(3, False), (2, True), (1, False)])


def test_flag_policy_keeps_serving_the_flagged_version(tmp_path: Path, tiny_model_path: Path, db_url: str) -> None:
    with running_app(tmp_path, tiny_model_path, db_url, shared_on_erase="flag") as client:
        keys = _two_shared_versions(client)
        assert client.delete("/users/dora", headers=bearer(keys["dora"])).status_code == 204
        assert _shared(client) == (2, [(2, True), (1, False)])


def test_one_users_key_rotation_does_not_block_the_bulk_retrain_of_the_others(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    # A user's own data-key rotation (any user may queue one) made retrain-stale answer 409 and roll back every
    # other stale user's job.
    import uuid
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    from service.db.models import Adapter, AdapterHead, Job

    def stale_adapter(session: Session, owner_key: str, user_pk: int | None) -> None:
        session.add(
            Adapter(
                owner_key=owner_key, user_pk=user_pk, version=1, sha256="0" * 64, rank=4, alpha=8.0,
                target_modules=["q_proj"], base_model="x", base_fingerprint="f", nbytes=1, source="trained",
                shared_version=None,
            )
        )  # fmt: skip
        session.add(AdapterHead(owner_key=owner_key, user_pk=user_pk, current_version=1, last_version=1))

    with running_app(tmp_path, tiny_model_path) as client:
        for user in ("ann", "ben", "cid"):
            create_user(client, user)
        with unit_of_work(app_state(client).session_factory) as session:
            users = {u: accounts.by_user_id(session, u) for u in ("ann", "ben", "cid")}
            stale_adapter(session, SHARED_OWNER, None)  # shared v1 current: every user's adapter is stale
            for ref in users.values():
                assert ref is not None
                stale_adapter(session, ref.storage_key, ref.id)
            ben, now = users["ben"], datetime.now(UTC)
            assert ben is not None
            session.add(
                Job(
                    id=str(uuid.uuid4()), kind="user_key_rotation", owner_key=ben.storage_key, user_pk=ben.id,
                    status="queued", progress=0.0, attempts=0, created_at=now, requeued_at=now,
                )
            )  # fmt: skip
        bulk = client.post("/admin/adapters/retrain-stale", headers=admin_headers())
        assert bulk.status_code == 202, bulk.text
        assert len(bulk.json()["jobs"]) == 2 and bulk.json()["skipped"] == 1
        assert bulk.json()["next_after"] is None  # 3 stale users, a page of 500: done
        # A page at a time (?limit, ?after=next_after), by user pk: each user once, the active jobs answered again.
        pages, after = [], 0
        while after is not None:
            r = client.post(f"/admin/adapters/retrain-stale?limit=1&after={after}", headers=admin_headers())
            assert r.status_code == 202, r.text
            pages.append((len(r.json()["jobs"]), r.json()["skipped"]))
            after = r.json()["next_after"]
        assert pages == [(1, 0), (0, 1), (1, 0), (0, 0)]
        for bad in ("limit=0", "limit=501", "after=-1", "limit=x"):
            r = client.post(f"/admin/adapters/retrain-stale?{bad}", headers=admin_headers())
            assert r.status_code == 422, (bad, r.text)
