"""`oppu migrate`, `oppu create-user` and `oppu train --user` in the foreground (tiny model, SQLite)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from service.config import Settings
from tests.models import MODEL_CACHE_DIR


def oppu(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


@contextmanager
def serving(tmp_path: Path, model: Path, **env_extra: str) -> Iterator[tuple[int, Path]]:
    """`oppu serve` on the embedded default (no OPPU_ variable but these) on a free port, until /readyz answers
    200: (port, log file). Terminated on exit."""
    import socket
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPPU_")}
    env |= {
        "OPPU_DATA_DIR": str(tmp_path / "data"), "OPPU_ADAPTERS_DIR": str(tmp_path / "adapters"),
        "OPPU_MODEL": str(model), "OPPU_MODEL_CACHE_DIR": str(MODEL_CACHE_DIR), **env_extra,
    }  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(30)


def test_migrate_create_user_and_train(tmp_path: Path, tiny_model_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    env = {
        **os.environ,
        "OPPU_DATABASE_URL": f"sqlite:///{db}",
        "OPPU_DATA_DIR": str(tmp_path / "data"),
        "OPPU_ADAPTERS_DIR": str(tmp_path / "store"),
        "OPPU_MODEL": str(tiny_model_path),
        "OPPU_MODEL_CACHE_DIR": str(MODEL_CACHE_DIR),
        "OPPU_TORCH_THREADS": "1",
    }
    assert oppu(env, "migrate").returncode == 0
    made = oppu(env, "create-user", "cli-user")
    assert made.returncode == 0 and "api_key=oppu_" in made.stdout and "recovery_code=" in made.stdout
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        pk = conn.execute(text("SELECT id FROM users WHERE user_id = 'cli-user'")).scalar_one()
        for i in range(3):
            conn.execute(
                text(
                    "INSERT INTO history_items (user_pk, client_id, output, created_at) "
                    "VALUES (:pk, :cid, :out, CURRENT_TIMESTAMP)"
                ),
                {"pk": pk, "cid": f"c{i}", "out": f"my answer {i}"},
            )
    trained = oppu(env, "train", "--user", "cli-user")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "succeeded adapter_version=1" in trained.stdout
    assert "training: 100%" in trained.stderr  # the progress bar reached the end
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM adapters")).scalar_one() == 1
    engine.dispose()
    assert oppu(env, "train", "--user", "nobody").returncode == 2


def test_serve_on_the_embedded_default_generates_and_uses_the_admin_key(tmp_path: Path, tiny_model_path: Path) -> None:
    """What `make serve` runs: no OPPU_ADMIN_KEY, no database URL. The first start writes the admin key into
    the data dir (0600, in a 0700 folder), prints where (never the key itself), and serves with it; the SQLite
    file and the adapter store are owner-only too."""
    import httpx

    with serving(tmp_path, tiny_model_path) as (port, log):
        key_file = tmp_path / "data" / "admin_key"
        key = key_file.read_text().strip()
        assert key not in log.read_text() and str(key_file) in log.read_text()  # the path is printed, not the key
        assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.parent.stat().st_mode & 0o777 == 0o700
        database = tmp_path / "data" / "oppu.sqlite3"
        assert database.stat().st_mode & 0o777 == 0o600, oct(database.stat().st_mode)
        assert (tmp_path / "adapters").stat().st_mode & 0o777 == 0o700
        headers = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"http://127.0.0.1:{port}/admin/users", json={"user_id": "alice"}, headers=headers)
        assert r.status_code == 201, r.text
        # Sealing is on by default: the master key was generated beside it (0600, path printed, never the key),
        # the keyring is its own file, and a user's history is not in the database file.
        master, keyring = tmp_path / "data" / "master_key", tmp_path / "data" / "keyring.sqlite3"
        assert master.stat().st_mode & 0o777 == 0o600 and str(master) in log.read_text()
        assert master.read_text().strip() not in log.read_text() and keyring.stat().st_mode & 0o777 == 0o600
        alice = {"Authorization": f"Bearer {r.json()['api_key']}"}
        items = {"items": [{"output": "canary-of-make-serve"}]}
        assert httpx.post(f"http://127.0.0.1:{port}/users/alice/history", json=items, headers=alice).status_code == 201
        on_disk = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("oppu.sqlite3*"))
        assert b"canary-of-make-serve" not in on_disk


def test_idle_connections_do_not_lock_out_requests(tmp_path: Path, tiny_model_path: Path) -> None:
    """uvicorn's limit_concurrency counted open connections: OPPU_MAX_CONCURRENCY idle sockets (no byte sent,
    no timeout) made every request a 503. The cap is on requests in flight now."""
    import socket
    import time

    import httpx

    idle: list[socket.socket] = []
    with serving(tmp_path, tiny_model_path, OPPU_MAX_CONCURRENCY="2") as (port, _):
        try:
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
            time.sleep(0.5)
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        finally:
            for sock in idle:
                sock.close()


def test_operator_mistakes_are_one_line_and_exit_2_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main
    from service.config import get_settings

    for name in [k for k in os.environ if k.startswith("OPPU_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OPPU_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        # Never migrated: each command that reads the database was an OperationalError traceback (no such table)
        for command in (["create-user", "alice"], ["keys", "status"], ["train", "--user", "alice"]):
            assert main(command) == 2
            assert "run `oppu migrate`" in capsys.readouterr().err
        assert main(["migrate"]) == 0
        assert main(["create-user", "alice"]) == 0
        assert main(["train", "--user", "alice"]) == 2  # no history: refused as the API refuses it (409)
        assert "no_history" in capsys.readouterr().err
        assert main(["create-user", "alice"]) == 2  # exists: was a Conflict traceback
        assert main(["create-user", "bad/id"]) == 2
        assert main(["eval", "movielens", "--out", str(tmp_path / "r.json"), "--set", "bogus=1"]) == 2
        assert main(["eval", "movielens", "--out", str(tmp_path / "r.json"), "--data", str(tmp_path / "no")]) == 2
        monkeypatch.setenv("OPPU_ADAPTER_TARGET_MODULES", "q_proj,v_proj")  # not JSON: was a SettingsError traceback
        get_settings.cache_clear()
        assert main(["create-user", "bob"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "conflict" in err.lower() and "invalid settings" in err
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [("0.0.0.0", None, True), ("::", "", True), ("0.0.0.0", "s3cret", False), ("127.0.0.1", None, False),
     ("localhost", None, False), ("[::1]", None, False)],
)  # fmt: skip
def test_serve_warns_when_metrics_naming_users_are_open_beyond_loopback(
    tmp_path: Path, host: str, token: str | None, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from service.cli import _warn_if_metrics_open

    settings = Settings(data_dir=tmp_path, metrics_token=token)
    with caplog.at_level(logging.WARNING, logger="oppu"):
        _warn_if_metrics_open(settings, host)
    assert any("OPPU_METRICS_TOKEN" in r.message for r in caplog.records) is warned, caplog.text
