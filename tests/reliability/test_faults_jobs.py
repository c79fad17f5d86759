"""Faults of the job queue and of erasure (issue 23 N4, N10), on a Redis server of this test's own (the shared
one cannot be stopped): Redis stopped then started again, a retrain requested meanwhile runs (the worker's
reaper re-enqueues the queued job whose enqueue failed); a key rotated during the outage still ends the local
stream (notices act on this replica before they are published); /readyz reports Redis; compose keeps Redis on
a volume with AOF. After an erase on SQLite, no erased text stays in the database or WAL file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.db.migrate import upgrade
from service.main import create_app
from service.state import AppState
from tests.conftest import (
    ADMIN_KEY,
    TEST_MASTER_KEY,
    admin_headers,
    bearer,
    create_user,
    live_server,
    make_settings,
    running_app,
)
from tests.factories import free_port
from tests.models import MODEL_CACHE_DIR

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SLOW_TICK_S = 0.03


class OwnRedis:
    """A redis-server on a free port, AOF in a folder of the test (as compose runs it); stop and start at will."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: these fault tests start and stop a Redis of their own")
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--dir", str(self.folder)]
        with open(self.folder / "redis.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.up():
            assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)

    def up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def start_worker(tmp: Path, db: str, redis_url: str, model: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPPU_")}
    env.update(
        OPPU_DATABASE_URL=db,
        OPPU_REDIS_URL=redis_url,
        OPPU_ADAPTERS_DIR=str(tmp / "adapters"),
        OPPU_DATA_DIR=str(tmp / "data"),
        OPPU_ADMIN_KEY=ADMIN_KEY,
        OPPU_MASTER_KEY=TEST_MASTER_KEY,  # every process seals under one master key (keyring: the shared data dir)
        OPPU_MODEL=str(model),
        OPPU_MODEL_CACHE_DIR=str(MODEL_CACHE_DIR),
        OPPU_DEVICE="cpu",
        OPPU_TORCH_THREADS="1",
        OPPU_JOB_REQUEUE_AFTER_S="1",
    )
    with open(tmp / "worker.log", "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(BIN / "oppu"), "worker"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM (RQ's warm shutdown), then SIGKILL for the whole group if it lingers (its backoff sleep)."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)


def worker_listening(server: OwnRedis, worker: subprocess.Popen[bytes], tmp: Path) -> bool:
    from redis import Redis

    assert worker.poll() is None, (tmp / "worker.log").read_text()[-3000:]
    with Redis.from_url(server.url) as redis:
        return bool(redis.scard("rq:workers"))


@pytest.mark.parametrize("worker_starts", ["before_the_outage", "during_the_outage"])
def test_a_retrain_requested_while_redis_is_down_runs_once_it_is_back(
    tmp_path: Path, tiny_model_path: Path, own_redis: OwnRedis, worker_starts: str
) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    if worker_starts == "during_the_outage":
        own_redis.stop()
    worker = start_worker(tmp_path, db, own_redis.url, tiny_model_path)
    try:
        with running_app(tmp_path, tiny_model_path, db, redis_url=own_redis.url) as client:
            key = create_user(client, "ola")
            items = [{"id": f"i{i}", "input": f"question {i}", "output": f"answer {i}"} for i in range(4)]
            assert client.post("/users/ola/history", json={"items": items}, headers=bearer(key)).status_code == 201
            if worker_starts == "before_the_outage":
                assert client.get("/readyz").json()["optional"] == {"redis": True}
                until(lambda: worker_listening(own_redis, worker, tmp_path), 60, "the worker did not start")
                own_redis.stop()
            time.sleep(2.0)  # the worker is up (or waiting for Redis) when the retrain is requested
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["optional"] == {"redis": False}  # reported, serving on
            r = client.post("/admin/users/ola/retrain", headers=admin_headers())
            assert r.status_code == 202, r.text  # the job row is committed; its enqueue fails (logged)
            job_id = r.json()["job_id"]
            time.sleep(1.5)
            assert client.get(f"/admin/jobs/{job_id}", headers=admin_headers()).json()["status"] == "queued"
            own_redis.start()

            def done() -> bool:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                status = client.get(f"/admin/jobs/{job_id}", headers=admin_headers()).json()["status"]
                assert status != "failed", (tmp_path / "worker.log").read_text()[-3000:]
                return bool(status == "succeeded")

            until(done, 120, "the retrain did not run after Redis came back")
            assert client.get("/users/ola/adapter", headers=bearer(key)).json()["version"] == 1
            assert client.get("/readyz").json()["optional"] == {"redis": True}
    finally:
        stop_worker(worker)


def test_rotation_during_a_redis_outage_still_ends_the_local_stream(
    tmp_path: Path, tiny_model_path: Path, own_redis: OwnRedis
) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    app = create_app(make_settings(tmp_path, db, str(tiny_model_path), redis_url=own_redis.url))
    with live_server(app) as base:
        state: AppState = app.state.oppu
        tick = state.engine._tick  # type: ignore[attr-defined]

        def slow_tick() -> bool:
            time.sleep(SLOW_TICK_S)
            return bool(tick())

        state.engine._tick = slow_tick  # type: ignore[attr-defined]
        r = httpx.post(f"{base}/admin/users", json={"user_id": "rob"}, headers=admin_headers(), timeout=30)
        key, code = r.json()["api_key"], r.json()["recovery_code"]
        own_redis.stop()
        body = {"prompt": "hi", "stream": True, "max_new_tokens": 500, "temperature": 0}
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", f"{base}/users/rob/generate", json=body, headers=bearer(key)) as stream,
        ):
            assert stream.status_code == 200
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data:") and '"text": "' in line and '""' not in line:
                    break
            rotated = httpx.post(
                f"{base}/users/rob/keys/rotate", json={"recovery_code": code}, headers=bearer(key), timeout=30
            )
            assert rotated.status_code == 200, rotated.text
            rotated_at = time.monotonic()
            rest = [line for line in lines if line]
            took = time.monotonic() - rotated_at
    assert took < 2.0, took
    assert "event: error" in rest and any("key_revoked" in line for line in rest), rest[-4:]


def test_compose_keeps_redis_on_a_volume_with_aof() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    data_dir = command[command.index("--dir") + 1]
    volumes = [v.split(":") for v in redis["volumes"]]
    assert any(target == data_dir and name in compose["volumes"] for name, target, *_ in volumes), volumes


def slow_down(state: AppState) -> None:
    tick = state.engine._tick  # type: ignore[attr-defined]

    def slow_tick() -> bool:
        time.sleep(SLOW_TICK_S)
        return bool(tick())

    state.engine._tick = slow_tick  # type: ignore[attr-defined]


def test_an_erase_on_one_replica_ends_the_users_request_on_another(
    tmp_path: Path, tiny_model_path: Path, own_redis: OwnRedis
) -> None:
    """Issue 23 N2 across replicas: a non-streaming request running on replica B ends with user_erased within a
    second of the erase on replica A (the erased notice; B's streams end on the revoked-keys notice)."""
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    apps = [
        create_app(make_settings(tmp_path / name, db, str(tiny_model_path), redis_url=own_redis.url))
        for name in ("a", "b")
    ]
    with live_server(apps[0]) as base_a, live_server(apps[1]) as base_b:
        state_b: AppState = apps[1].state.oppu
        slow_down(state_b)
        r = httpx.post(f"{base_a}/admin/users", json={"user_id": "zoe"}, headers=admin_headers(), timeout=30)
        key = r.json()["api_key"]
        answer: list[httpx.Response] = []
        body = {"prompt": "hi", "max_new_tokens": 500, "temperature": 0}
        worker = threading.Thread(
            target=lambda: answer.append(
                httpx.post(f"{base_b}/users/zoe/generate", json=body, headers=bearer(key), timeout=60)
            )
        )
        worker.start()
        until(lambda: state_b.engine.stats().running == 1, 30, "the request did not start on replica B")
        assert httpx.delete(f"{base_a}/admin/users/zoe", headers=admin_headers(), timeout=30).status_code == 204
        erased_at = time.monotonic()
        worker.join(30)
        took = time.monotonic() - erased_at
    assert took < 1.0, took
    assert answer[0].status_code == 401 and answer[0].json()["code"] == "user_erased", answer[0].text
