"""A user's data-key rotation as a background job (`user_key_rotation`), on SQLite and PostgreSQL: the routes,
the job's end state (one key version left, nothing sealed under the old one, everything still readable), two
replicas over one keyring (the second one never hears the rotation's notice: only the re-check of its cached keys
keeps its writes readable), idempotent appends across the rotation, and the 409/404/403 answers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from service.composition import sealer_of
from service.config import Settings
from service.db.migrate import upgrade
from service.db.models import HistoryItem, Profile, User
from service.db.session import unit_of_work
from service.history import service as history
from service.history.schemas import HistoryAppendIn, HistoryItemIn
from service.main import create_app
from service.sealing import cipher
from service.tenancy import Caller, authorize_user
from tests.conftest import _pg_fresh_schema_url, admin_headers, app_state, bearer, create_user, make_settings
from tests.factories import add_history, random_lora_zip, storage_key, upload, wait_job

RECHECK_S = 0.1
SETTLE_S = 0.6  # >= RECHECK_S plus a margin, as the job's default (OPPU_KEY_RECHECK_S + 1 s) is


def _settings(tmp_path: Path, db_url: str, model: Path, **overrides: object) -> Settings:
    # Rotations back to back here: the owner's interval (its own test below) is off.
    values = {"key_recheck_s": RECHECK_S, "data_key_rotation_interval_s": 0.0, **overrides}
    return make_settings(tmp_path, db_url, str(model), **values)


@pytest.fixture
def rot_settings(tmp_path: Path, db_url: str, tiny_model_path: Path) -> Settings:
    return _settings(tmp_path, db_url, tiny_model_path)


@pytest.fixture
def rot_client(rot_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(rot_settings), raise_server_exceptions=False) as c:
        app_state(c).jobs.key_settle_s = SETTLE_S
        yield c


def _rotate(client: TestClient, user: str) -> dict[str, object]:
    r = client.post(f"/admin/users/{user}/keys/rotate-data-key", headers=admin_headers())
    assert r.status_code == 202, r.text
    job: dict[str, object] = r.json()
    assert job["kind"] == "user_key_rotation" and job["status"] in ("queued", "running")
    return job


def _stored_versions(settings: Settings, owner: str) -> set[int]:
    """Every data-key version the owner's stored rows and adapter files are sealed under."""
    engine = create_engine(settings.resolved_database_url)
    try:
        with engine.connect() as conn:
            pk = conn.scalar(select(User.id).where(User.storage_key == owner))
            tokens = list(conn.scalars(select(HistoryItem.sealed).where(HistoryItem.user_pk == pk)))
            tokens += list(conn.scalars(select(Profile.sealed).where(Profile.user_pk == pk)))
    finally:
        engine.dispose()
    assert tokens and all(t is not None for t in tokens)
    versions = {cipher.token_version(t) for t in tokens if t is not None}
    files = [p for p in (settings.adapters_dir / "users" / owner).rglob("*") if p.is_file()]
    assert files
    return versions | {cipher.file_version(p.read_bytes()) for p in files}


def test_the_job_reseals_everything_and_destroys_the_old_key(rot_client: TestClient, rot_settings: Settings) -> None:
    c = rot_client
    key = create_user(c, "ann")
    add_history(c, "ann", key, n=3)
    assert c.put("/users/ann/profile", json={"text": "likes zebras"}, headers=bearer(key)).status_code == 200
    shapes = app_state(c).adapters.spec.linear_shapes
    assert upload(c, "ann", key, random_lora_zip(shapes, None, seed=1)).status_code in (200, 201)
    before = c.get("/users/ann/adapter/download", headers=bearer(key)).content
    owner = storage_key(c, "ann")
    assert _stored_versions(rot_settings, owner) == {1}

    job = wait_job(c, str(_rotate(c, "ann")["job_id"]))
    assert job["status"] == "succeeded" and job["adapter_version"] is None, job

    assert sealer_of(app_state(c).db).live_versions(owner) == [2]  # the keyring holds the new version only
    assert _stored_versions(rot_settings, owner) == {2}  # no row, profile or file left under version 1
    items = c.get("/users/ann/history", headers=bearer(key)).json()["items"]
    assert [i["id"] for i in items] == ["i0", "i1", "i2"] and "zebracorn" in items[0]["output"]
    assert c.get("/users/ann/profile", headers=bearer(key)).json()["text"] == "likes zebras"
    assert c.get("/users/ann/adapter/download", headers=bearer(key)).content == before
    # the owner's own route: a second rotation, any of their keys
    r = c.post("/users/ann/keys/rotate-data-key", headers=bearer(key))
    assert r.status_code == 202 and r.json()["kind"] == "user_key_rotation", r.text
    job_id = r.json()["job_id"]
    assert wait_job(c, job_id)["status"] == "succeeded"
    # the owner polls it on their own route; for another user it does not exist
    own = c.get(f"/users/ann/jobs/{job_id}", headers=bearer(key))
    assert own.status_code == 200 and own.json()["job_id"] == job_id and own.json()["status"] == "succeeded"
    bob = create_user(c, "bob")
    assert c.get(f"/users/bob/jobs/{job_id}", headers=bearer(bob)).json()["code"] == "not_found"
    assert c.get(f"/users/ann/jobs/{job_id}", headers=bearer(bob)).status_code == 403
    assert sealer_of(app_state(c).db).live_versions(owner) == [3]
    assert _stored_versions(rot_settings, owner) == {3}


def test_a_shutdown_stops_the_running_rotation_and_the_next_start_finishes_it(rot_settings: Settings) -> None:
    """Embedded mode: the app's exit stops the running job at its next settle tick instead of leaving it running
    past the database it writes to; the next start runs it again from the start, and it succeeds."""
    with TestClient(create_app(rot_settings), raise_server_exceptions=False) as c:
        app_state(c).jobs.key_settle_s = 600.0  # a rotation that would outlast the app by far
        key = create_user(c, "ann")
        add_history(c, "ann", key, n=2)
        job_id = str(_rotate(c, "ann")["job_id"])
        deadline = time.monotonic() + 30
        while c.get(f"/admin/jobs/{job_id}", headers=admin_headers()).json()["status"] != "running":
            assert time.monotonic() < deadline, "the rotation never started"
            time.sleep(0.05)
        exiting = time.monotonic()
    assert time.monotonic() - exiting < 15
    assert not [t for t in threading.enumerate() if t.name.startswith("oppu-jobs") and t.is_alive()]
    with TestClient(create_app(rot_settings), raise_server_exceptions=False) as c:  # re-queued at start
        assert wait_job(c, job_id)["status"] == "succeeded"
        owner = storage_key(c, "ann")
        assert sealer_of(app_state(c).db).live_versions(owner) == [3]  # the stopped attempt's v2 went with v1
        assert [i["id"] for i in c.get("/users/ann/history", headers=bearer(key)).json()["items"]] == ["i0", "i1"]


@pytest.fixture
def pg_rot_settings(tmp_path: Path, tiny_model_path: Path) -> Iterator[Settings]:
    for url in _pg_fresh_schema_url():  # row locks: what SQLite's single writer makes moot
        upgrade(url)
        yield _settings(tmp_path, url, tiny_model_path)


def test_an_append_sealed_before_the_rotation_and_committed_late_is_resealed_not_lost(
    pg_rot_settings: Settings,
) -> None:
    """An append seals under version 1 and is slow to commit; the rotation starts meanwhile. Its re-seal sweep
    waits for the append (the owner's row lock), sees the row, re-seals it; only then is version 1 destroyed.
    Without the lock the sweep found nothing, version 1 went, and the late row could never be read again."""
    with TestClient(create_app(pg_rot_settings), raise_server_exceptions=False) as c:
        state = app_state(c)
        state.jobs.key_settle_s = 0.0
        key = create_user(c, "ann")
        add_history(c, "ann", key, n=2)
        with unit_of_work(state.db.session_factory) as session:
            ann = authorize_user(session, Caller(is_admin=True), "ann")
        with unit_of_work(state.db.session_factory) as slow:
            body = HistoryAppendIn(items=[HistoryItemIn(id="late", input="q", output="sealed before, committed after")])
            assert history.append(slow, ann, body).added == 1  # sealed under version 1, not committed
            job_id = str(_rotate(c, "ann")["job_id"])
            time.sleep(1.5)  # the job has made version 2 and reached its sweep
        assert wait_job(c, job_id)["status"] == "succeeded"
        assert sealer_of(state.db).live_versions(ann.storage_key) == [2]
        r = c.get("/users/ann/history", headers=bearer(key))
        assert r.status_code == 200, r.text
        assert [i["id"] for i in r.json()["items"]] == ["i0", "i1", "late"]


def test_an_upload_staged_before_the_rotation_and_committed_after_it_is_resealed(
    pg_rot_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload's files are sealed under version 1 (staged, outside any lock); the whole rotation runs and
    destroys version 1; then the upload commits. Under the owner's lock it re-seals what it staged under the
    newest version, so the adapter still opens (it used to come back 409 sealed_data_unreadable for good)."""
    with TestClient(create_app(pg_rot_settings), raise_server_exceptions=False) as c:
        state = app_state(c)
        state.jobs.key_settle_s = 0.0
        key = create_user(c, "ann")
        add_history(c, "ann", key, n=1)
        assert state.adapters is not None
        store, staged, go = state.adapters.store, threading.Event(), threading.Event()
        real_stage = store.stage

        def stage_then_wait(files: Any, storage_key: str) -> Path:
            path = real_stage(files, storage_key)
            staged.set()
            assert go.wait(30)
            return path

        monkeypatch.setattr(store, "stage", stage_then_wait)
        answers: list[Any] = []
        archive = random_lora_zip(state.adapters.spec.linear_shapes, None, seed=4)
        uploader = threading.Thread(target=lambda: answers.append(upload(c, "ann", key, archive)))
        uploader.start()
        assert staged.wait(30)  # sealed under version 1, nothing committed yet
        assert wait_job(c, str(_rotate(c, "ann")["job_id"]))["status"] == "succeeded"  # version 1 destroyed
        go.set()
        uploader.join(30)
        assert answers and answers[0].status_code in (200, 201), answers[0].text
        r = c.get("/users/ann/adapter/download", headers=bearer(key))
        assert r.status_code == 200, r.text
        assert _stored_versions(pg_rot_settings, storage_key(c, "ann")) == {2}


@contextmanager
def _two_replicas(
    tmp_path: Path, db_url: str, model: Path, second_recheck_s: float
) -> Iterator[tuple[TestClient, TestClient]]:
    """Replica 1 runs the jobs; replica 2 shares the database, adapter store and keyring, and never hears the
    rotation's notice (its outbox poll is an hour away, and the in-process queue has no pub/sub)."""
    first = create_app(_settings(tmp_path, db_url, model))
    second = create_app(
        _settings(tmp_path, db_url, model, key_recheck_s=second_recheck_s, notice_poll_s=3600.0, notice_keep_s=7200.0)
    )
    with (
        TestClient(first, raise_server_exceptions=False) as c1,
        TestClient(second, raise_server_exceptions=False) as c2,
    ):
        app_state(c1).jobs.key_settle_s = SETTLE_S
        yield c1, c2


def test_a_second_replica_writing_during_the_rotation_stays_readable(
    tmp_path: Path, db_url: str, tiny_model_path: Path
) -> None:
    with _two_replicas(tmp_path, db_url, tiny_model_path, RECHECK_S) as (c1, c2):
        _write_through_the_second_replica(c1, c2)


def _write_through_the_second_replica(c1: TestClient, c2: TestClient) -> None:
    key = create_user(c1, "ann")
    add_history(c2, "ann", key, n=2)  # replica 2 has opened (and cached) ann's version-1 key
    shapes = app_state(c2).adapters.spec.linear_shapes
    job_id = str(_rotate(c1, "ann")["job_id"])
    n, uploaded = 0, False
    while c1.get(f"/admin/jobs/{job_id}", headers=admin_headers()).json()["status"] in ("queued", "running"):
        r = c2.post("/users/ann/history", json={"items": [{"id": f"d{n}", "input": "q", "output": "during"}]},
                    headers=bearer(key))  # fmt: skip
        assert r.status_code == 201, r.text
        n += 1
        if n == 1 and not uploaded:  # an adapter upload through replica 2 in the middle of the rotation
            assert upload(c2, "ann", key, random_lora_zip(shapes, None, seed=2)).status_code in (200, 201)
            uploaded = True
        time.sleep(0.03)
    assert wait_job(c1, job_id)["status"] == "succeeded"
    # writes before, around and after the mid-rotation upload (a count, not a rate: a loaded box writes slower)
    assert uploaded and n >= 2
    # right after the old key is destroyed, replica 2 writes again
    after = [{"id": f"a{i}", "input": "q", "output": "after"} for i in range(3)]
    assert c2.post("/users/ann/history", json={"items": after}, headers=bearer(key)).status_code == 201
    assert upload(c2, "ann", key, random_lora_zip(shapes, None, seed=3)).status_code in (200, 201)
    owner = storage_key(c1, "ann")
    assert sealer_of(app_state(c1).db).live_versions(owner) == [2]
    for c in (c1, c2):
        r = c.get("/users/ann/history", params={"limit": 1000}, headers=bearer(key))
        assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == 2 + n + 3
        assert c.get("/users/ann/adapter/download", headers=bearer(key)).status_code == 200
        versions = c.get("/users/ann/adapter/versions", headers=bearer(key))
        for v in versions.json()["versions"]:
            got = c.get(f"/users/ann/adapter/download?version={v['version']}", headers=bearer(key))
            assert got.status_code == 200, got.text


def test_without_the_recheck_a_stale_replica_seals_under_a_destroyed_key(tmp_path: Path, tiny_model_path: Path) -> None:
    """The control (SQLite is enough): replica 2 never re-checks its cached keys (what every process did before
    OPPU_KEY_RECHECK_S) and writes under the version the rotation destroyed: what it wrote does not open. (It
    writes the profile: a history append re-reads the key versions for its idempotency lookup anyway.)"""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db_url)
    with _two_replicas(tmp_path, db_url, tiny_model_path, 1e9) as (c1, c2):
        _stale_replica_writes(c1, c2)


def _stale_replica_writes(c1: TestClient, c2: TestClient) -> None:
    key = create_user(c1, "ann")
    add_history(c2, "ann", key, n=2)
    assert wait_job(c1, str(_rotate(c1, "ann")["job_id"]))["status"] == "succeeded"
    assert c2.put("/users/ann/profile", json={"text": "late"}, headers=bearer(key)).status_code == 200
    r = c1.get("/users/ann/profile", headers=bearer(key))
    assert r.status_code == 409 and r.json()["code"] == "sealed_data_unreadable", r.text


def test_the_same_client_id_before_and_during_the_rotation_is_one_row(rot_client: TestClient) -> None:
    c = rot_client
    key = create_user(c, "ann")
    item = {"items": [{"id": "same", "input": "q", "output": "first"}]}
    assert c.post("/users/ann/history", json=item, headers=bearer(key)).json()["added"] == 1
    job_id = str(_rotate(c, "ann")["job_id"])
    time.sleep(RECHECK_S * 3)  # inside the settle time: version 2 is current, the row still under version 1
    assert c.get(f"/admin/jobs/{job_id}", headers=admin_headers()).json()["status"] == "running"
    r = c.post("/users/ann/history", json=item, headers=bearer(key))
    assert r.status_code == 201 and r.json()["added"] == 0 and r.json()["duplicates"] == 1, r.text
    assert wait_job(c, job_id)["status"] == "succeeded"
    r = c.post("/users/ann/history", json=item, headers=bearer(key))  # after: the row is under version 2 now
    assert r.json()["added"] == 0
    items = c.get("/users/ann/history", headers=bearer(key)).json()["items"]
    assert [i["id"] for i in items] == ["same"] and items[0]["output"] == "first"


def test_answers_409_404_403(rot_client: TestClient) -> None:
    c = rot_client
    app_state(c).jobs.key_settle_s = 2.0  # bob's rotation holds the one in-process runner meanwhile
    ann, bob = create_user(c, "ann"), create_user(c, "bob")
    add_history(c, "ann", ann, n=2)
    add_history(c, "bob", bob, n=2)
    bob_job = _rotate(c, "bob")
    assert _rotate(c, "bob")["job_id"] == bob_job["job_id"]  # a rotation under way is returned as is
    # ... and never as the answer to a retrain (202 with the rotation's job: the retrain silently never ran)
    busy = c.post("/admin/users/bob/retrain", headers=admin_headers())
    assert busy.status_code == 409 and busy.json()["code"] == "job_active", busy.text
    assert busy.json()["details"]["active_job"]["job_id"] == bob_job["job_id"]
    retrain = c.post("/admin/users/ann/retrain", headers=admin_headers()).json()
    assert retrain["kind"] == "user_retrain" and retrain["status"] == "queued", retrain
    for path, headers in (
        ("/admin/users/ann/keys/rotate-data-key", admin_headers()),
        ("/users/ann/keys/rotate-data-key", bearer(ann)),
    ):
        r = c.post(path, headers=headers)
        assert r.status_code == 409 and r.json()["code"] == "job_active", r.text
        assert retrain["job_id"] in r.json()["message"]
        assert r.json()["details"]["active_job"]["job_id"] == retrain["job_id"]
    assert c.post("/admin/users/nobody/keys/rotate-data-key", headers=admin_headers()).status_code == 404
    assert c.post("/admin/users/bob/keys/rotate-data-key", headers=bearer(ann)).status_code == 403
    assert c.post("/users/bob/keys/rotate-data-key", headers=bearer(ann)).status_code == 403  # another user's
    assert c.post("/users/ann/keys/rotate-data-key").status_code == 401
    c.post(f"/admin/jobs/{retrain['job_id']}/cancel", headers=admin_headers())
    assert wait_job(c, str(bob_job["job_id"]))["status"] == "succeeded"


def test_sealing_off_answers_409(tmp_path: Path, db_url: str, tiny_model_path: Path) -> None:
    settings = _settings(tmp_path, db_url, tiny_model_path, seal_at_rest=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        key = create_user(c, "ann")
        for path, headers in (
            ("/admin/users/ann/keys/rotate-data-key", admin_headers()),
            ("/users/ann/keys/rotate-data-key", bearer(key)),
        ):
            r = c.post(path, headers=headers)
            assert r.status_code == 409 and r.json()["code"] == "sealing_off", r.text


def test_a_user_erased_mid_rotation_ends_the_job_cleanly(
    rot_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    c = rot_client
    app_state(c).jobs.key_settle_s = 1.5
    key = create_user(c, "ann")
    add_history(c, "ann", key, n=2)
    job_id = str(_rotate(c, "ann")["job_id"])
    time.sleep(0.3)
    with caplog.at_level(logging.INFO):
        assert c.delete("/users/ann", headers=admin_headers()).status_code == 204
        deadline = time.monotonic() + 20
        while app_state(c).queue.depth() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert app_state(c).queue.depth() == 0
    assert c.get(f"/admin/jobs/{job_id}", headers=admin_headers()).status_code == 404  # went with the user
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert any(job_id in r.getMessage() for r in caplog.records)  # the one log line


def test_an_owner_rotates_their_data_key_at_most_once_per_interval(
    tmp_path: Path, db_url: str, tiny_model_path: Path
) -> None:
    """Each rotation re-seals the user's whole history on a shared worker and keeps a job row for 30 days: an
    owner looping on their own route made ~10k a day. After one succeeded, the owner's route is 429 with
    Retry-After for the interval; a rotation under way is still answered; the admin's route is not limited."""
    settings = _settings(tmp_path, db_url, tiny_model_path, data_key_rotation_interval_s=3600.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        app_state(c).jobs.key_settle_s = SETTLE_S
        key = create_user(c, "ann")
        add_history(c, "ann", key, n=2)
        first = c.post("/users/ann/keys/rotate-data-key", headers=bearer(key))
        assert first.status_code == 202, first.text
        again = c.post("/users/ann/keys/rotate-data-key", headers=bearer(key))  # under way: the same job
        assert again.status_code == 202 and again.json()["job_id"] == first.json()["job_id"]
        assert wait_job(c, first.json()["job_id"])["status"] == "succeeded"
        r = c.post("/users/ann/keys/rotate-data-key", headers=bearer(key))
        assert r.status_code == 429 and r.json()["code"] == "too_many_requests", r.text
        assert 3500 < int(r.headers["Retry-After"]) <= 3600
        admin = c.post("/admin/users/ann/keys/rotate-data-key", headers=admin_headers())
        assert admin.status_code == 202, admin.text  # the recovery path
        assert wait_job(c, admin.json()["job_id"])["status"] == "succeeded"
        admin = c.post("/users/ann/keys/rotate-data-key", headers=admin_headers())  # the admin on the owner's route
        assert admin.status_code == 202, admin.text
        bob = create_user(c, "bob")  # another owner is not limited by ann's rotations
        assert c.post("/users/bob/keys/rotate-data-key", headers=bearer(bob)).status_code == 202
