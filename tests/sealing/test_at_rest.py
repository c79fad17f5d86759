"""Encryption at rest through the API (issue 19's acceptance), on SQLite and PostgreSQL: a canary in a user's
history, profile and adapter never reaches the database file / pg_dump, the adapter store, or the temp files an
upload, download or export writes, while the owner still reads it back; a ciphertext moved to another user
fails cleanly; a backup restored after an erase no longer opens that user (410) and others stay intact; a
master-key rotation under live traffic fails no request; a wrong or missing master key stops the start and
overwrites nothing; an existing plaintext deployment is sealed in place."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import unquote

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save
from sqlalchemy import create_engine, text

from service import cli, composition
from service.adapters.archive import pack_zip
from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, make_peft_config
from service.config import Settings, get_settings
from service.main import create_app
from service.sealing import operations
from service.sealing.kek import Keyset, MasterKeyError, write_keyset
from service.state import AppState
from tests.conftest import (
    TEST_MASTER_KEY,
    admin_headers,
    app_state,
    bearer,
    create_user,
    live_server,
    make_settings,
)

CANARY = "zebracorn-canary-7731"


def canary_adapter(client: TestClient) -> tuple[bytes, bytes]:
    """(a valid LoRA zip whose config carries the canary, 48 bytes of its weights to look for on disk)."""
    gen = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    for path, (d_in, d_out) in sorted(app_state(client).adapters.spec.linear_shapes.items()):
        if path.rsplit(".", 1)[-1] in ("q_proj", "v_proj"):
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(4, d_in, generator=gen) * 0.1
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(d_out, 4, generator=gen) * 0.1
    config = {**make_peft_config(4, 8.0, ("q_proj", "v_proj"), None), "revision": CANARY}
    weights = save(tensors)
    return pack_zip({CONFIG_NAME: json.dumps(config).encode(), WEIGHTS_NAME: weights}), weights[-48:]


def seed_user(client: TestClient, user: str) -> tuple[str, bytes]:
    key = create_user(client, user)
    items = [
        {"id": f"{CANARY}-id-{i}", "input": f"q {CANARY}", "output": f"a {i} {CANARY}", "metadata": {"c": CANARY}}
        for i in range(3)
    ]
    assert client.post(f"/users/{user}/history", json={"items": items}, headers=bearer(key)).status_code == 201
    assert client.put(f"/users/{user}/profile", json={"text": f"likes {CANARY}"}, headers=bearer(key)).is_success
    archive, weight_bytes = canary_adapter(client)
    r = client.put(
        f"/users/{user}/adapter", content=archive, headers={**bearer(key), "Content-Type": "application/zip"}
    )
    assert r.status_code in (200, 201), r.text
    return key, weight_bytes


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from (p for p in root.rglob("*") if p.is_file())


def pg_dump(db_url: str) -> bytes:
    schema = unquote(db_url).rsplit("search_path=", 1)[1]
    out = subprocess.run(
        ["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-n", schema, "--data-only"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return out.stdout


@pytest.fixture
def temp_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """The temp files the server writes (uploads, downloads, exports) kept on disk where the test can read them."""
    kept: list[Path] = []
    folder = tmp_path / "server-temp"
    folder.mkdir()

    def named() -> IO[bytes]:
        fh = tempfile.NamedTemporaryFile(dir=folder, delete=False)  # noqa: SIM115 - the server closes it
        kept.append(Path(fh.name))
        return fh

    monkeypatch.setattr(tempfile, "TemporaryFile", named)  # the module sealed temp files take it from
    return kept


def test_a_canary_never_reaches_disk_and_its_owner_still_reads_it(
    client: TestClient, settings: Settings, db_url: str, temp_files: list[Path]
) -> None:
    key, weight_bytes = seed_user(client, "alice")
    history = client.get("/users/alice/history", headers=bearer(key)).json()["items"]
    assert [i["id"] for i in history] == [f"{CANARY}-id-{i}" for i in range(3)]
    assert history[0]["input"] == f"q {CANARY}" and history[2]["metadata"] == {"c": CANARY}
    assert CANARY in client.get("/users/alice/profile", headers=bearer(key)).json()["text"]
    dup = {"items": [{"id": f"{CANARY}-id-1", "output": "again"}]}  # idempotency still works on keyed hashes
    assert client.post("/users/alice/history", json=dup, headers=bearer(key)).json()["duplicates"] == 1
    download = client.get("/users/alice/adapter/download", headers=bearer(key))
    assert download.status_code == 200
    assert CANARY in zipfile.ZipFile(io.BytesIO(download.content)).read(CONFIG_NAME).decode()
    export = zipfile.ZipFile(io.BytesIO(client.get("/users/alice/export", headers=bearer(key)).content))
    assert CANARY in export.read("history.jsonl").decode() and CANARY in export.read("profile.json").decode()
    assert client.post(
        "/users/alice/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers=bearer(key)
    ).is_success

    app_state(client).db.checkpoint()
    assert len(temp_files) >= 3  # the upload body, the download and the export went through temp files
    for path in files_under(settings.data_dir, settings.adapters_dir, *{p.parent for p in temp_files}):
        data = path.read_bytes()
        assert CANARY.encode() not in data, path
        assert weight_bytes not in data, path
    if db_url.startswith("postgresql"):
        dump = pg_dump(db_url)
        assert b"history_items" in dump and CANARY.encode() not in dump


def test_a_ciphertext_moved_to_another_user_fails_cleanly(client: TestClient, db_url: str) -> None:
    alice, _ = seed_user(client, "alice")
    bob = create_user(client, "bob")
    client.post("/users/bob/history", json={"items": [{"id": "b1", "output": "bob's own"}]}, headers=bearer(bob))
    client.put("/users/bob/profile", json={"text": "bob"}, headers=bearer(bob))
    engine = create_engine(db_url)
    with engine.begin() as conn:
        stolen = conn.execute(text("SELECT sealed FROM history_items WHERE output = '' LIMIT 1")).scalar_one()
        profile = conn.execute(
            text("SELECT p.sealed FROM profiles p JOIN users u ON u.id = p.user_pk WHERE u.user_id = 'alice'")
        ).scalar_one()
        conn.execute(
            text("UPDATE history_items SET sealed = :s WHERE user_pk = (SELECT id FROM users WHERE user_id = 'bob')"),
            {"s": stolen},
        )
        conn.execute(
            text("UPDATE profiles SET sealed = :s WHERE user_pk = (SELECT id FROM users WHERE user_id = 'bob')"),
            {"s": profile},
        )
    engine.dispose()
    for path in ("/users/bob/history", "/users/bob/profile"):
        r = client.get(path, headers=bearer(bob))
        assert r.status_code == 409 and r.json()["code"] == "sealed_data_unreadable", r.text
        assert CANARY not in r.text
    assert client.get("/users/alice/history", headers=bearer(alice)).status_code == 200

    store = app_state(client).store
    bob_archive, _ = canary_adapter(client)
    client.put("/users/bob/adapter", content=bob_archive, headers={**bearer(bob), "Content-Type": "application/zip"})
    alice_dir, bob_dir = (store.version_dir(composition_key(client, u), 1) for u in ("alice", "bob"))
    shutil.copyfile(alice_dir / WEIGHTS_NAME, bob_dir / WEIGHTS_NAME)
    r = client.get("/users/bob/adapter/download", headers=bearer(bob))
    assert r.status_code == 409 and r.json()["code"] == "sealed_data_unreadable", r.text


def test_a_ciphertext_copied_to_a_user_without_a_key_is_unreadable_not_erased(client: TestClient, db_url: str) -> None:
    # carol never wrote anything (no data key, no tombstone): alice's sealed profile copied into her row answered
    # 410 user_data_erased, though carol was never erased; it is 409 sealed_data_unreadable, as for any copy.
    seed_user(client, "alice")
    carol = create_user(client, "carol")
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO profiles (user_pk, text, source, sealed, updated_at) "
                "SELECT (SELECT id FROM users WHERE user_id = 'carol'), '', 'user', p.sealed, p.updated_at "
                "FROM profiles p JOIN users u ON u.id = p.user_pk WHERE u.user_id = 'alice'"
            )
        )
    engine.dispose()
    r = client.get("/users/carol/profile", headers=bearer(carol))
    assert r.status_code == 409 and r.json()["code"] == "sealed_data_unreadable", r.text
    assert CANARY not in r.text


def composition_key(client: TestClient, user_id: str) -> str:
    from tests.factories import storage_key

    return storage_key(client, user_id)


def _schema(db_url: str) -> str:
    return unquote(db_url).rsplit("search_path=", 1)[1]


def backup_database(db_url: str, folder: Path, live: AppState) -> None:
    """The operator's nightly backup of the database (`pg_dump -Fc`, or a copy of the checkpointed SQLite file)."""
    if db_url.startswith("postgresql"):
        dump = ["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-n", _schema(db_url), "-Fc"]
        subprocess.run([*dump, "-f", str(folder / "db.dump")], check=True, timeout=60)
    else:
        live.db.checkpoint()
        shutil.copyfile(db_url.removeprefix("sqlite:///"), folder / "db.sqlite3")


def restore_database(db_url: str, folder: Path) -> None:
    if db_url.startswith("postgresql"):
        restore = ["pg_restore", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "--clean", "--if-exists"]
        subprocess.run([*restore, "-n", _schema(db_url), str(folder / "db.dump")], check=True, timeout=60)
    else:
        db = Path(db_url.removeprefix("sqlite:///"))
        shutil.copyfile(folder / "db.sqlite3", db)
        for f in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            f.unlink(missing_ok=True)


def test_a_backup_restored_after_an_erase_does_not_open_the_erased_user(settings: Settings, db_url: str) -> None:
    backup = settings.data_dir.parent / "backup"
    backup.mkdir()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        alice, _ = seed_user(client, "alice")
        bob, _ = seed_user(client, "bob")
        backup_database(db_url, backup, app_state(client))  # database and store; the keyring is not in it
        shutil.copytree(settings.adapters_dir, backup / "adapters")
        assert client.delete("/users/alice", headers=bearer(alice)).status_code == 204
    restore_database(db_url, backup)
    shutil.rmtree(settings.adapters_dir)
    shutil.copytree(backup / "adapters", settings.adapters_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for path in (
            "/users/alice/history",
            "/users/alice/profile",
            "/users/alice/adapter/download",
            "/users/alice/export",
        ):
            r = client.get(path, headers=bearer(alice))  # the restored key still authenticates
            assert r.status_code == 410 and r.json()["code"] == "user_data_erased", (path, r.text)
            assert CANARY not in r.text
        r = client.post("/users/alice/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers=bearer(alice))
        assert r.status_code == 410, r.text
        assert CANARY in client.get("/users/bob/history", headers=bearer(bob)).text  # others intact
        assert client.get("/users/bob/adapter/download", headers=bearer(bob)).status_code == 200


def test_master_key_rotation_under_live_traffic_fails_no_request(tmp_path: Path, tiny_model_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    from service.db.migrate import upgrade

    upgrade(db)
    key_file = tmp_path / "master_key"
    write_keyset(key_file, Keyset.single(bytes(range(32))), exclusive=True)
    settings = make_settings(tmp_path, db, str(tiny_model_path), master_key=None, master_key_file=key_file)
    app = create_app(settings)
    failures: list[str] = []
    done = threading.Event()
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        keys = {}
        for i in range(4):
            r = http.post("/admin/users", json={"user_id": f"u{i}"}, headers=admin_headers())
            keys[f"u{i}"] = r.json()["api_key"]
            http.post(
                f"/users/u{i}/history",
                json={"items": [{"id": "x", "output": f"{CANARY} {i}"}]},
                headers=bearer(keys[f"u{i}"]),
            )

        def traffic(worker: int) -> None:
            n = 0
            while not done.is_set():
                user = f"u{n % 4}"
                n += 1
                for r in (
                    http.get(f"/users/{user}/history", headers=bearer(keys[user])),
                    http.post(
                        f"/users/{user}/history",
                        json={"items": [{"output": f"w{worker} {n}"}]},
                        headers=bearer(keys[user]),
                    ),
                    http.post("/admin/users", json={"user_id": f"new-{worker}-{n}"}, headers=admin_headers()),
                ):
                    if not r.is_success:
                        failures.append(f"{r.request.url} {r.status_code} {r.text}")

        threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        rotated = Keyset.parse(key_file.read_text()).with_new_primary()
        write_keyset(key_file, rotated)  # what `oppu keys rotate-master` does, then its re-wrap loop
        rotation = operations.rotate_master(composition.sealer(settings), progress=lambda _: None, settle_s=1.0)
        time.sleep(0.5)
        done.set()
        for t in threads:
            t.join()
        assert not failures, failures[:5]
        assert rotation.count >= 4
        seals = composition.sealer(settings)
        operations.rotate_master(seals, progress=lambda _: None)  # keys made under the old one meanwhile
        assert set(seals.kek_counts()) == {rotated.primary}
        write_keyset(key_file, rotated.without(set(rotated.keys) - {rotated.primary}))  # --retire-old
        for i in range(4):
            assert f"{CANARY} {i}" in http.get(f"/users/u{i}/history", headers=bearer(keys[f"u{i}"])).text


def test_a_wrong_or_missing_master_key_stops_the_start_and_overwrites_nothing(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    db = tmp_path / "db.sqlite3"
    from service.db.migrate import upgrade

    upgrade(f"sqlite:///{db}")
    settings = make_settings(tmp_path, f"sqlite:///{db}", str(tiny_model_path))
    with TestClient(create_app(settings)) as client:
        key = create_user(client, "alice")
        client.post("/users/alice/history", json={"items": [{"output": CANARY}]}, headers=bearer(key))
    keyring = settings.data_dir / "keyring.sqlite3"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (db, keyring)}
    wrong = Keyset.single(bytes(32)).dump()
    for bad in (settings.with_overrides(master_key=wrong), settings.with_overrides(master_key=None)):
        with pytest.raises(MasterKeyError), TestClient(create_app(bad)):
            pass
    assert not (settings.data_dir / "master_key").exists()  # nothing generated over a keyring in use
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (db, keyring)} == before
    with TestClient(create_app(settings)) as client:
        assert CANARY in client.get("/users/alice/history", headers=bearer(key)).text


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Settings], None]]:
    """Points `oppu` (service.cli.main, in this process) at a deployment's settings, and nothing else."""

    def point_at(settings: Settings) -> None:
        for name in [k for k in os.environ if k.startswith("OPPU_")]:
            monkeypatch.delenv(name)
        for name, value in {
            "OPPU_DATA_DIR": settings.data_dir, "OPPU_DATABASE_URL": settings.resolved_database_url,
            "OPPU_ADAPTERS_DIR": settings.adapters_dir, "OPPU_MASTER_KEY": TEST_MASTER_KEY,
        }.items():  # fmt: skip
            monkeypatch.setenv(name, str(value))
        get_settings.cache_clear()

    yield point_at
    get_settings.cache_clear()


def test_an_existing_plaintext_deployment_is_sealed_in_place(
    tmp_path: Path,
    db_url: str,
    tiny_model_path: Path,
    cli_env: Callable[[Settings], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `oppu keys seal-existing` said "nothing is left in plaintext" while a serving replica kept the SQLite file
    # open: the WAL was never checkpointed, and db.sqlite3 still held every canary (this test checkpointed by
    # hand, and scanned the data dir, not the database file). On PostgreSQL the old row versions stay until VACUUM.
    sealed = make_settings(tmp_path, db_url, str(tiny_model_path))
    plain = sealed.with_overrides(seal_at_rest=False)
    with TestClient(create_app(plain)) as client:
        key, weight_bytes = seed_user(client, "alice")
    database_files = list(tmp_path.glob("db.sqlite3*"))
    if db_url.startswith("sqlite"):
        assert any(CANARY.encode() in p.read_bytes() for p in database_files)
    with pytest.raises(MasterKeyError, match="seal-existing"), TestClient(create_app(sealed)):
        pass  # half-sealed data is not served unless told to (and the refused start closes its pools)
    cli_env(sealed)
    replica = sealed.with_overrides(seal_allow_plaintext=True)
    with TestClient(create_app(replica)) as client:  # a replica serving meanwhile: the database stays open
        assert client.get("/users/alice/history", headers=bearer(key)).status_code == 200
        capsys.readouterr()
        assert cli.main(["keys", "seal-existing"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("sealed ") and "sealed 0 " not in out, out
        for path in [*database_files, *files_under(sealed.data_dir, sealed.adapters_dir)]:
            assert CANARY.encode() not in path.read_bytes(), path  # the database's own files too, while open
            assert weight_bytes not in path.read_bytes(), path
        if db_url.startswith("sqlite"):
            assert "nothing is left in plaintext" in out, out
        else:  # the live rows are sealed; the old row versions are dead tuples until VACUUM: said, not denied
            assert CANARY.encode() not in pg_dump(db_url)
            assert "nothing is left" not in out and "VACUUM" in out, out
        assert cli.main(["keys", "seal-existing"]) == 0  # resumable: nothing left to seal
        assert "sealed 0 rows" in capsys.readouterr().out
        history = client.get("/users/alice/history", headers=bearer(key)).json()["items"]
        assert [i["id"] for i in history] == [f"{CANARY}-id-{i}" for i in range(3)]
    with TestClient(create_app(sealed)) as client:
        history = client.get("/users/alice/history", headers=bearer(key)).json()["items"]
        assert [i["id"] for i in history] == [f"{CANARY}-id-{i}" for i in range(3)]
        dup = {"items": [{"id": f"{CANARY}-id-0", "output": "again"}]}
        assert client.post("/users/alice/history", json=dup, headers=bearer(key)).json()["duplicates"] == 1
        assert CANARY in client.get("/users/alice/profile", headers=bearer(key)).text
        assert client.get("/users/alice/adapter/download", headers=bearer(key)).status_code == 200
