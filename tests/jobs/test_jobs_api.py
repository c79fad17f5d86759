"""Training jobs through HTTP on the embedded runner (tiny model): retrain, dedupe, adapter served."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from service.db.models import Job
from tests.conftest import admin_headers, bearer, create_user
from tests.factories import add_history, wait_job


def test_retrain_publishes_and_serves_new_version(client: TestClient) -> None:
    key = create_user(client, "alice")
    add_history(client, "alice", key)
    r = client.post(
        "/users/alice/generate", json={"prompt": "hi", "max_new_tokens": 4, "temperature": 0}, headers=bearer(key)
    )
    assert r.json()["adapter_version"] is None
    r = client.post("/admin/users/alice/retrain", headers=admin_headers())
    assert r.status_code == 202, r.text
    assert set(r.json()) >= {"job_id", "status", "progress", "adapter_version", "error"}
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert job["adapter_version"] == 1
    meta = client.get("/users/alice/adapter", headers=bearer(key)).json()
    assert meta["version"] == 1 and meta["source"] == "trained"
    r = client.post(
        "/users/alice/generate", json={"prompt": "hi", "max_new_tokens": 4, "temperature": 0}, headers=bearer(key)
    )
    assert r.status_code == 200 and r.json()["adapter_version"] == 1
    r = client.post(
        "/users/alice/generate",
        json={"prompt": "hi", "max_new_tokens": 4, "temperature": 0, "use_adapter": False},
        headers=bearer(key),
    )
    assert r.json()["adapter_version"] is None


def test_concurrent_retrain_requests_make_one_job(client: TestClient, db_url: str) -> None:
    key = create_user(client, "bob")
    add_history(client, "bob", key, n=3)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: client.post("/admin/users/bob/retrain", headers=admin_headers()), range(20)))
    assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
    ids = {a.json()["job_id"] for a in answers}
    assert len(ids) == 1
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Job)).scalar_one() == 1
    engine.dispose()
    assert wait_job(client, ids.pop())["status"] == "succeeded"


def test_user_key_cannot_retrain_or_read_jobs(client: TestClient) -> None:
    key = create_user(client, "carol")
    assert client.post("/admin/users/carol/retrain", headers=bearer(key)).status_code == 403
    assert client.get("/admin/jobs/x", headers=bearer(key)).status_code == 403
    assert client.get("/admin/jobs/nope", headers=admin_headers()).status_code == 404
    for path in ("/admin/jobs/a%00b", "/users/carol/jobs/%00"):  # a NUL byte (PostgreSQL refused it: 500)
        headers = admin_headers() if path.startswith("/admin") else bearer(key)
        assert client.get(path, headers=headers).status_code == 404
    assert client.post("/admin/jobs/%00/cancel", headers=admin_headers()).status_code == 404


def test_auto_retrain_after_new_items(tmp_path: object, tiny_model_path: object) -> None:
    from pathlib import Path

    from tests.conftest import running_app

    tmp, model = Path(str(tmp_path)), Path(str(tiny_model_path))
    with running_app(tmp, model, raise_server_exceptions=True, retrain_after_new_items=5) as client:
        key = create_user(client, "auto")
        add_history(client, "auto", key, n=4)
        assert client.get("/users/auto/adapter", headers=bearer(key)).status_code == 404
        state = client.app.state.oppu  # type: ignore[attr-defined]
        assert state.queue.depth() == 0  # 4 < 5: nothing enqueued
        items = [{"id": "extra", "output": "one more"}]
        client.post("/users/auto/history", json={"items": items}, headers=bearer(key))
        deadline = time.monotonic() + 60
        while client.get("/users/auto/adapter", headers=bearer(key)).status_code != 200:
            assert time.monotonic() < deadline, "auto-retrain did not publish"
            time.sleep(0.2)
        assert client.get("/users/auto/adapter", headers=bearer(key)).json()["metadata"]["cutoff_item_id"] == 5


def test_cancel_route(client: TestClient) -> None:
    key = create_user(client, "dora")
    add_history(client, "dora", key, n=3)
    job = client.post("/admin/users/dora/retrain", headers=admin_headers()).json()
    assert wait_job(client, job["job_id"])["status"] == "succeeded"
    r = client.post(f"/admin/jobs/{job['job_id']}/cancel", headers=admin_headers())
    assert r.status_code == 200 and r.json()["status"] == "succeeded"  # a finished job stays as it is
    assert client.post(f"/admin/jobs/{job['job_id']}/cancel", headers=bearer(key)).status_code == 403
    r = client.post("/admin/jobs/no-such-job/cancel", headers=admin_headers())
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_a_retrain_of_a_user_without_history_is_409_no_history(client: TestClient) -> None:
    create_user(client, "hal")
    r = client.post("/admin/users/hal/retrain", headers=admin_headers())
    assert r.status_code == 409 and r.json()["code"] == "no_history", r.text
