"""The operator's commands (`oppu keys ...`) on a real deployment's files: status, a master-key rotation that
leaves every user readable under the new key alone, and one user's data-key rotation (rows and adapter files
re-sealed, the old key destroyed, idempotency kept; the background job's body, run in the foreground)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import cli
from service.composition import sealer_of
from service.config import Settings, get_settings
from service.db import session as db_session
from service.main import create_app
from service.sealing import cipher
from service.sealing.kek import Keyset, write_keyset
from tests.conftest import admin_headers, app_state, bearer, create_user, make_settings
from tests.factories import add_history, random_lora_zip, storage_key, upload, wait_job


@pytest.fixture
def deployment(tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """An embedded deployment with a master key FILE (what rotate-master rewrites), visible to the CLI."""
    from service.db.migrate import upgrade

    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    key_file = tmp_path / "master_key"
    write_keyset(key_file, Keyset.single(bytes(range(32))), exclusive=True)
    settings = make_settings(tmp_path, db, str(tiny_model_path), master_key=None, master_key_file=key_file)
    for name, value in {
        "OPPU_DATA_DIR": settings.data_dir, "OPPU_DATABASE_URL": db, "OPPU_ADAPTERS_DIR": settings.adapters_dir,
        "OPPU_MASTER_KEY_FILE": key_file, "OPPU_MODEL": tiny_model_path,
    }.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def test_rotate_master_then_retire_leaves_everyone_readable_under_the_new_key(
    deployment: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with TestClient(create_app(deployment)) as client:
        keys = {u: create_user(client, u) for u in ("ann", "ben")}
        for user, key in keys.items():
            add_history(client, user, key, n=3)
    old = Keyset.parse(Path(str(deployment.master_key_file)).read_text())
    assert cli.main(["keys", "rotate-master", "--settle-s", "0", "--retire-old"]) == 0
    new = Keyset.parse(Path(str(deployment.master_key_file)).read_text())
    assert new.primary != old.primary and set(new.keys) == {new.primary}  # the old key is gone from the file
    capsys.readouterr()
    assert cli.main(["keys", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["data_keys_by_kek"] == {new.primary: 2} and status["plaintext"] == {
        "history_items": 0, "profiles": 0, "adapter_versions": 0,
    }  # fmt: skip
    with TestClient(create_app(deployment)) as client:
        for user, key in keys.items():
            assert "zebracorn" in client.get(f"/users/{user}/history", headers=bearer(key)).text


def test_rotate_user_reseals_rows_and_files_and_destroys_the_old_key(
    deployment: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPPU_KEY_RECHECK_S", "0.05")  # the CLI waits OPPU_KEY_RECHECK_S + 1 s before re-sealing
    get_settings.cache_clear()
    with TestClient(create_app(deployment)) as client:
        key = create_user(client, "ann")
        add_history(client, "ann", key, n=3)
        client.put("/users/ann/profile", json={"text": "likes zebras"}, headers=bearer(key))
        shapes = app_state(client).adapters.spec.linear_shapes
        assert upload(client, "ann", key, random_lora_zip(shapes, None, seed=1)).status_code in (200, 201)
        owner = storage_key(client, "ann")
        before = client.get("/users/ann/adapter/download", headers=bearer(key)).content
    capsys.readouterr()
    assert cli.main(["keys", "rotate-user", "ann"]) == 0
    out = capsys.readouterr().out
    assert "waiting 1.1 s" in out and "the old key is destroyed" in out, out
    weights = next((deployment.adapters_dir / "users" / owner).rglob("adapter_model.safetensors")).read_bytes()
    assert cipher.file_version(weights) == 2
    with TestClient(create_app(deployment)) as client:
        items = client.get("/users/ann/history", headers=bearer(key)).json()["items"]
        assert [i["id"] for i in items] == ["i0", "i1", "i2"]
        again = {"items": [{"id": "i1", "output": "dup"}]}  # the keyed hashes were re-made under the new key
        assert client.post("/users/ann/history", json=again, headers=bearer(key)).json()["duplicates"] == 1
        assert client.get("/users/ann/profile", headers=bearer(key)).json()["text"] == "likes zebras"
        after = client.get("/users/ann/adapter/download", headers=bearer(key)).content
        seals = sealer_of(app_state(client).db)
        assert len(after) == len(before)
        assert set(seals._load(owner)) == {2}  # version 1 is destroyed


def test_rotate_master_with_a_replica_open_leaves_no_old_wrapping_in_the_keyring_files(
    deployment: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # With a serving replica holding the keyring open, nothing checkpointed its WAL: after `--retire-old` the
    # keyring's main file still held every data key wrapped under the retired master key.
    keyring = deployment.data_dir / "keyring.sqlite3"
    with TestClient(create_app(deployment)) as client:
        keys = {u: create_user(client, u) for u in ("ann", "ben")}
        for user, key in keys.items():
            add_history(client, user, key, n=2)
    with closing(sqlite3.connect(keyring)) as conn:
        old = [bytes(row[0]) for row in conn.execute("SELECT wrapped FROM data_keys")]
    assert len(old) == 2 and all(w in keyring.read_bytes() for w in old)
    with TestClient(create_app(deployment)) as client:  # a replica serving meanwhile: the keyring stays open
        assert cli.main(["keys", "rotate-master", "--settle-s", "0", "--retire-old"]) == 0
        on_disk = b"".join(p.read_bytes() for p in keyring.parent.glob("keyring.sqlite3*"))
        assert not [w for w in old if w in on_disk]
        assert "retired master keys: ['" in capsys.readouterr().out
        for user, key in keys.items():
            assert "zebracorn" in client.get(f"/users/{user}/history", headers=bearer(key)).text


def test_seal_existing_says_so_when_a_reader_keeps_the_plaintext_on_disk(
    deployment: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It printed "nothing is left in plaintext" whatever the files held. A connection that keeps reading blocks
    # the checkpoint (SQLite's busy timeout, 30 s, is waited out first: 2 s here): the command says so, exits 3.
    monkeypatch.setattr(db_session, "SQLITE_BUSY_TIMEOUT_S", 2.0)
    with TestClient(create_app(deployment.with_overrides(seal_at_rest=False))) as client:
        add_history(client, "ann", create_user(client, "ann"), n=3)
    database = Path(str(deployment.database_url).removeprefix("sqlite:///"))

    def on_disk() -> bytes:
        return b"".join(p.read_bytes() for p in database.parent.glob(f"{database.name}*"))

    assert b"zebracorn" in on_disk()
    with closing(sqlite3.connect(database, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM history_items").fetchone() == (3,)  # a read under way
        capsys.readouterr()
        assert cli.main(["keys", "seal-existing"]) == 3  # cli.OLD_BYTES_LEFT
        said = capsys.readouterr()
        assert "nothing is left" not in said.out + said.err, said
        assert "sealed 3 rows" in said.err and "blocked by another connection" in said.err, said.err
        assert b"zebracorn" in on_disk()  # what it warned of
        reader.execute("COMMIT")
        assert cli.main(["keys", "seal-existing"]) == 0  # run again once the reader is done: checkpointed
        assert "sealed 0 rows and adapter versions; nothing is left in plaintext" in capsys.readouterr().out
        assert b"zebracorn" not in on_disk()


def test_rotate_user_is_refused_while_a_background_rotation_of_the_user_runs(
    deployment: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `oppu keys rotate-user` skipped the one-active-job-per-owner guard: run beside the background rotation, each
    # re-sealed the adapter files the other had just re-sealed (under its own new version) until RotationStalled
    # failed an attempt. It is a job of its own now: refused while another is active, and the job it ran is seen.
    monkeypatch.setenv("OPPU_KEY_RECHECK_S", "0.05")  # the CLI's own rotation below: a short settle
    get_settings.cache_clear()
    with TestClient(create_app(deployment)) as client:  # the server's rotation settles OPPU_KEY_RECHECK_S 5 + 1 s
        key = create_user(client, "ann")
        add_history(client, "ann", key, n=3)
        shapes = app_state(client).adapters.spec.linear_shapes
        assert upload(client, "ann", key, random_lora_zip(shapes, None, seed=1)).status_code in (200, 201)
        owner = storage_key(client, "ann")
        r = client.post("/admin/users/ann/keys/rotate-data-key", headers=admin_headers())
        assert r.status_code == 202, r.text
        background = r.json()["job_id"]
        capsys.readouterr()
        assert cli.main(["keys", "rotate-user", "ann"]) == 2
        err = capsys.readouterr().err
        assert f"already under way (job {background}" in err and "Traceback" not in err, err
        job = wait_job(client, background)
        assert (job["status"], job["attempts"], job["error"]) == ("succeeded", 1, None), job
        seals = sealer_of(app_state(client).db)
        assert seals.live_versions(owner) == [2]
        retrain = client.post("/admin/users/ann/retrain", headers=admin_headers()).json()["job_id"]
        assert cli.main(["keys", "rotate-user", "ann"]) == 2  # a retrain is the owner's one active job too
        err = capsys.readouterr().err
        assert "job_active" in err and retrain in err and "Traceback" not in err, err
        assert wait_job(client, retrain)["status"] == "succeeded"
        assert cli.main(["keys", "rotate-user", "ann"]) == 0  # nothing else active: it runs, as a job of its own
        out = capsys.readouterr().out
        assert "the old key is destroyed" in out, out
        mine = out.split("(job ", 1)[1].split(")", 1)[0]
        assert client.get(f"/admin/jobs/{mine}", headers=admin_headers()).json()["status"] == "succeeded"
        assert seals.live_versions(owner) == [3]
        assert "zebracorn" in client.get("/users/ann/history", headers=bearer(key)).text
