"""Export, self-erase (nothing left in SQL, store or cache), key rotation and revocation."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, insert, select

from service.db.models import Adapter, AdapterHead, ApiKey, HistoryItem, Job, Profile, User
from tests.conftest import admin_headers, app_state, bearer, builtin_engine, create_user, running_app
from tests.factories import add_history, wait_job


def test_export_then_erase_leaves_nothing(client: TestClient, db_url: str) -> None:
    key = create_user(client, "dana")
    add_history(client, "dana", key, n=4)
    client.put("/users/dana/profile", json={"text": "likes zebras"}, headers=bearer(key))
    job = client.post("/admin/users/dana/retrain", headers=admin_headers()).json()
    assert wait_job(client, job["job_id"])["status"] == "succeeded"
    client.post(
        "/users/dana/generate", json={"prompt": "hi", "max_new_tokens": 2, "temperature": 0}, headers=bearer(key)
    )
    state, cache = app_state(client), builtin_engine(client).cache
    storage_key = next(k.owner_key for k in cache.host_keys() + list(cache.slot_keys()))

    r = client.get("/users/dana/export", headers=bearer(key))
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    names = set(zf.namelist())
    assert {"manifest.json", "history.jsonl", "profile.json", "adapters/v1/adapter_model.safetensors"} <= names
    assert len(zf.read("history.jsonl").decode().splitlines()) == 4
    # The adapter as the user downloads it (opened, not the sealed bytes at rest): a PEFT folder that loads.
    download = zipfile.ZipFile(io.BytesIO(client.get("/users/dana/adapter/download", headers=bearer(key)).content))
    for name in download.namelist():
        assert zf.read(f"adapters/v1/{name}") == download.read(name)
    assert json.loads(zf.read("adapters/v1/adapter_config.json"))["peft_type"] == "LORA"
    assert json.loads(zf.read("profile.json"))["text"] == "likes zebras"
    (exported_key,) = json.loads(zf.read("keys.json"))  # metadata only: neither the key nor its hash
    assert key.startswith(exported_key["prefix"]) and exported_key["revoked_at"] is None
    assert all(key not in zf.read(name).decode("latin-1") for name in zf.namelist())
    (exported_job,) = json.loads(zf.read("jobs.json"))
    assert exported_job["job_id"] == job["job_id"] and exported_job["status"] == "succeeded"
    assert exported_job["adapter_version"] == 1

    other = create_user(client, "eve")
    assert client.delete("/users/dana", headers=bearer(other)).status_code == 403
    assert client.delete("/users/dana", headers=bearer(key)).status_code == 204
    assert client.get("/users/dana/history", headers=bearer(key)).status_code == 401
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(User).where(User.user_id == "dana")).scalar_one() == 0
        for table in (HistoryItem, Profile, ApiKey, Adapter, Job):
            n = conn.execute(select(func.count()).select_from(table)).scalar_one()
            expected = 1 if table is ApiKey else 0  # eve's key remains
            assert n == expected, table.__tablename__
        assert (
            conn.execute(
                select(func.count()).select_from(AdapterHead).where(AdapterHead.owner_key == storage_key)
            ).scalar_one()
            == 0
        )
    engine.dispose()
    assert not state.store.key_dir(storage_key).exists()
    assert all(k.owner_key != storage_key for k in cache.host_keys())
    assert all(k.owner_key != storage_key for k in cache.slot_keys())


def _create(client: TestClient, user_id: str) -> tuple[str, str]:
    r = client.post("/admin/users", json={"user_id": user_id}, headers=admin_headers())
    assert r.status_code == 201, r.text
    return r.json()["api_key"], r.json()["recovery_code"]


def test_an_export_writes_every_job_of_the_owner_a_page_at_a_time(client: TestClient, db_url: str) -> None:
    """jobs.json was one list of every kept job row, dumped at once (200k rows: +224 MiB in the process)."""
    key = create_user(client, "jobby")
    create_user(client, "other")
    engine = create_engine(db_url)
    with engine.begin() as conn:
        owners = dict(conn.execute(select(User.user_id, User.storage_key)).all())
        start = datetime(2026, 1, 1, tzinfo=UTC)
        rows = [
            {
                "id": f"0000000{k}-0000-4000-8000-{i:012d}", "kind": "key_rotation", "owner_key": owners[user],
                "status": "succeeded", "created_at": start + timedelta(seconds=i), "finished_at": start,
                "progress": 1.0, "attempts": 1,
            }
            for k, (user, n) in enumerate((("jobby", 1_234), ("other", 7))) for i in range(n)
        ]  # fmt: skip
        conn.execute(insert(Job), rows)
    engine.dispose()
    zf = zipfile.ZipFile(io.BytesIO(client.get("/users/jobby/export", headers=bearer(key)).content))
    jobs = json.loads(zf.read("jobs.json"))
    assert [j["job_id"] for j in jobs] == [r["id"] for r in rows[:1_234]]  # the owner's only, oldest first
    assert jobs[0]["created_at"] == start.isoformat() and jobs[0]["error"] is None
    assert json.loads(zf.read("manifest.json"))["training_jobs"] == 1_234


def test_rotate_and_revoke(client: TestClient) -> None:
    old, code = _create(client, "finn")
    r = client.post("/users/finn/keys/rotate", json={"recovery_code": code}, headers=bearer(old))
    assert r.status_code == 200, r.text
    new = r.json()["api_key"]
    assert client.get("/users/finn/history", headers=bearer(old)).status_code == 401
    assert client.get("/users/finn/history", headers=bearer(new)).status_code == 200
    assert client.post("/admin/users/finn/keys/revoke", headers=bearer(new)).status_code == 403
    r = client.post("/admin/users/finn/keys/revoke", headers=admin_headers())
    assert r.status_code == 200 and r.json()["revoked"] == 1
    assert client.get("/users/finn/history", headers=bearer(new)).status_code == 401


def test_a_stolen_key_alone_cannot_rotate_the_owner_out(client: TestClient) -> None:
    """The owner's rotation needs the key AND the recovery code; the admin's needs neither (recovery path)."""
    key, code = _create(client, "gale")
    _, other_code = _create(client, "hugo")
    for body in (None, {}, {"recovery_code": None}, {"recovery_code": "oppurc_wrong"}, {"recovery_code": key},
                 {"recovery_code": other_code}):  # fmt: skip
        r = client.post("/users/gale/keys/rotate", json=body, headers=bearer(key))
        assert r.status_code == 403 and r.json()["code"] == "reauth_required", (body, r.text)
    assert client.get("/users/gale/history", headers=bearer(key)).status_code == 200  # nothing changed
    assert client.get("/users/gale/history", headers=bearer(code)).status_code == 401  # a code is no bearer key
    r = client.post("/users/gale/keys/rotate", json={"recovery_code": code}, headers=bearer(key))
    assert r.status_code == 200, r.text
    key2, code2 = r.json()["api_key"], r.json()["recovery_code"]
    assert code2 != code and key2 != key
    # The old code is spent: the owner's next rotation takes the new one.
    r = client.post("/users/gale/keys/rotate", json={"recovery_code": code}, headers=bearer(key2))
    assert r.status_code == 403 and r.json()["code"] == "reauth_required"
    # The admin rotates without a code (the owner lost it, or their key leaked): a fresh key and code.
    r = client.post("/users/gale/keys/rotate", headers=admin_headers())
    assert r.status_code == 200, r.text
    key3, code3 = r.json()["api_key"], r.json()["recovery_code"]
    assert client.get("/users/gale/history", headers=bearer(key2)).status_code == 401
    r = client.post("/users/gale/keys/rotate", json={"recovery_code": code2}, headers=bearer(key3))
    assert r.status_code == 403  # the admin's rotation replaced the code too
    r = client.post("/users/gale/keys/rotate", json={"recovery_code": code3}, headers=bearer(key3))
    assert r.status_code == 200, r.text
    described = client.get("/openapi.json").json()["paths"]["/users/{user_id}/keys/rotate"]["post"]["description"]
    assert "recovery_code" in described and "reauth_required" in described


def test_another_users_key_cannot_rotate_even_with_the_code(client: TestClient) -> None:
    _, code = _create(client, "ivy")
    mallory, _ = _create(client, "mal")
    r = client.post("/users/ivy/keys/rotate", json={"recovery_code": code}, headers=bearer(mallory))
    assert r.status_code == 403 and r.json()["code"] == "forbidden"


def test_no_erased_text_stays_in_the_sqlite_files(tmp_path: Path, tiny_model_path: Path) -> None:
    """Issue 23 N10: after the 204, neither the database file nor its WAL holds the erased history or profile
    (secure_delete zeroes the freed bytes; a checkpoint after the erase truncates the WAL)."""
    canary = "CANARY-erased-zq81x"
    with running_app(tmp_path, tiny_model_path, seal_at_rest=False) as client:  # plaintext rows: what is zeroed
        key = create_user(client, "wendy")
        create_user(client, "xena")  # another user's rows share the pages
        items = [{"id": f"c{i}", "input": f"{canary} q{i}", "output": f"{canary} a{i}"} for i in range(50)]
        assert client.post("/users/wendy/history", json={"items": items}, headers=bearer(key)).status_code == 201
        assert client.put("/users/wendy/profile", json={"text": canary}, headers=bearer(key)).status_code == 200
        files = [tmp_path / "db.sqlite3", tmp_path / "db.sqlite3-wal"]
        assert any(canary.encode() in f.read_bytes() for f in files if f.exists())  # the check can see it
        assert client.delete("/users/wendy", headers=bearer(key)).status_code == 204
        for f in files:
            if f.exists():
                assert canary.encode() not in f.read_bytes(), f.name


def test_an_index_being_built_when_the_erase_commits_is_not_cached_after_it(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request indexing the user's history (seconds on a long one) when their erase commits: the erase's
    # invalidation ran before the index was stored, which kept every item's plaintext in memory afterwards.
    import threading

    import service.history.service as history_service
    from tests.factories import storage_key

    with running_app(tmp_path, tiny_model_path) as client:
        key = create_user(client, "alice")
        add_history(client, "alice", key, n=6)
        owner = storage_key(client, "alice")
        real = history_service._build_corpus
        erased: list[int] = []

        def build_then_erase(*args: Any, **kwargs: Any) -> Any:
            corpus = real(*args, **kwargs)
            eraser = threading.Thread(
                target=lambda: erased.append(client.delete("/users/alice", headers=bearer(key)).status_code)
            )
            eraser.start()
            eraser.join(60)
            return corpus

        monkeypatch.setattr(history_service, "_build_corpus", build_then_erase)
        client.post("/users/alice/generate", json={"prompt": "zebracorn", "max_new_tokens": 1}, headers=bearer(key))
        assert erased == [204]
        assert app_state(client).bm25.peek(owner) is None
