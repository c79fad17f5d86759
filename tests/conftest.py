"""Shared fixtures: databases (SQLite + the real PostgreSQL), the tiny model, app clients."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.config import Settings
from service.db.migrate import upgrade
from service.engine.builtin.engine import BuiltinEngine
from service.main import create_app
from service.state import AppState
from tests.models import MODEL_CACHE_DIR, tiny_model_dir

ADMIN_KEY = "test-admin-key-0123456789"
PG_SERVER_URL = os.environ.get("OPPU_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("OPPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _pg_fresh_schema_url() -> Iterator[str]:
    """A fresh PostgreSQL schema per test, via search_path; fails loudly if the server is down."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # never skip: the suite claims PostgreSQL behaviour
        pytest.fail(f"PostgreSQL at {PG_SERVER_URL} is not reachable ({exc}); start it (see README)")
    sep = "&" if "?" in PG_SERVER_URL else "?"
    yield f"{PG_SERVER_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
        upgrade(url)
        yield url
    else:
        for url in _pg_fresh_schema_url():
            upgrade(url)
            yield url


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return tiny_model_dir()


TEST_MASTER_KEY = "dGVzdC1tYXN0ZXIta2V5LW9mLTMyLWJ5dGVzLWxvbmc="  # base64 of 32 fixed bytes (tests only)


def make_settings(tmp_path: Path, db: str, model: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "database_url": db,
        "adapters_dir": tmp_path / "adapters",
        "model": model,
        "model_cache_dir": MODEL_CACHE_DIR,
        "admin_key": ADMIN_KEY,
        "batch_window_ms": 2.0,
        "dtype": "float32",  # auto follows the CPU (bf16 on AMX boxes): tests must not change with the box
        "packed_weights": "off",  # auto follows it too; tests/engine/test_packed.py and test_builtin.py pack
        "master_key": TEST_MASTER_KEY,  # a fixed KEK: PostgreSQL settings need one (SQLite would generate it)
        "auth_max_failures": 0,  # matrices send many bad keys from one address; test_auth_limit turns it on
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def running_app(
    tmp: Path, model: str | Path, db: str | None = None, *, raise_server_exceptions: bool = False, **overrides: object
) -> Iterator[TestClient]:
    """An app on `model` with make_settings(**overrides); `db` None: a fresh migrated SQLite file in `tmp`."""
    if db is None:
        db = f"sqlite:///{tmp / 'db.sqlite3'}"
        upgrade(db)
    app = create_app(make_settings(tmp, db, str(model), **overrides))
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        yield client


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """The app behind a real uvicorn server on a free loopback port (real concurrency and streaming, which the
    test client does not give); yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)


@pytest.fixture
def settings(tmp_path: Path, db_url: str, tiny_model_path: Path) -> Settings:
    return make_settings(tmp_path, db_url, str(tiny_model_path))


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def sqlite_client(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[TestClient]:
    """One app on SQLite + tiny model shared by a module's tests (for matrices of many requests)."""
    with running_app(tmp_path_factory.mktemp("app"), tiny_model_path) as c:
        yield c


def app_state(client: TestClient) -> AppState:
    state: AppState = client.app.state.oppu  # type: ignore[attr-defined]
    return state


def builtin_engine(client: TestClient) -> BuiltinEngine:
    """The app's engine, for tests of the builtin engine's internals (cache tiers, merged weights)."""
    engine = app_state(client).engine
    assert isinstance(engine, BuiltinEngine)
    return engine


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_user(client: TestClient, user_id: str) -> str:
    r = client.post("/admin/users", json={"user_id": user_id}, headers=admin_headers())
    assert r.status_code == 201, r.text
    key: str = r.json()["api_key"]
    return key


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The faults group (issue 23's findings, each reproduced): every test in a test_faults_*.py module, so
    `pytest -m faults` runs exactly them; CI runs them with the rest."""
    for item in items:
        if item.path.name.startswith("test_faults_"):
            item.add_marker(pytest.mark.faults)
