"""Faults at adapter intake and in downloads (issue 23 N1, N5, N7, N8, N9), each against the app as it serves:
archives that inflate (sparse tar members, huge declared sizes) and deeply nested JSON are a 422 that costs
little memory; downloads and exports stream from disk behind a per-user gate; stalled upload bodies hold no
gate and end at their deadline; an upload racing an erase, a full disk and a client that leaves mid-upload are
4xx/507 JSON answers, never a 500 or an unhandled error in the log. Part of the reliability suite (CI)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import socket
import sqlite3
import struct
import tarfile
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service import data_rights
from service.adapters import repository as adapter_repo
from service.adapters import service as adapter_service
from service.adapters import store as store_module
from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from service.config import ALL_TARGET_MODULES, Settings
from service.db.migrate import upgrade
from service.db.models import User
from service.db.session import AFTER_ROLLBACK
from service.main import create_app
from service.state import AppState
from tests.conftest import ADMIN_KEY, app_state, bearer, create_user, live_server, make_settings, running_app
from tests.factories import pax_sparse_bomb, random_lora_zip, sparse_bomb

if TYPE_CHECKING:  # TestClient's responses (starlette's testclient uses httpx2 where installed)
    import httpx2

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MB = 1_000_000


# --- helpers ---


def small_adapter(state: AppState, seed: int = 0) -> bytes:
    return random_lora_zip(state.adapters.spec.linear_shapes, None, seed)


def put(client: TestClient, user: str, key: str, body: bytes) -> httpx2.Response:
    headers = {**bearer(key), "Content-Type": "application/zip"}
    return client.put(f"/users/{user}/adapter", content=body, headers=headers)


def assert_json_error(r: httpx.Response | httpx2.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) >= {"code", "message"} and "Traceback" not in r.text, body
    if code is not None:
        assert body["code"] == code, body
    return body


def traced_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn's result and the peak of Python allocations (every thread: the app's too) above where it began."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def readme_bomb(size: int = 300 << 20) -> bytes:
    """A .tar.gz (~300 KB) whose README.md really holds `size` zero bytes: before the fix it was read (up to
    the ratio cap, ~60 MB) although README.md is ignored."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tf:
        info = tarfile.TarInfo("README.md")
        info.size = size
        tf.addfile(info, io.BufferedReader(_Zeros(size)))
    return buf.getvalue()


def _with_member(adapter_zip: bytes, name: str, patch: Callable[[bytes], bytes]) -> bytes:
    with zipfile.ZipFile(io.BytesIO(adapter_zip)) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    files[name] = patch(files[name])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
    return buf.getvalue()


def nested_config(config: bytes, depth: int = 100_000) -> bytes:
    return config.rstrip()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"


def nested_header(weights: bytes, depth: int = 100_000) -> bytes:
    (n,) = struct.unpack("<Q", weights[:8])
    raw = weights[8 : 8 + n].rstrip()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + weights[8 + n :]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[TestClient]:
    with running_app(
        tmp_path_factory.mktemp("faults"), tiny_model_path, download_concurrency=2, download_concurrency_per_user=1
    ) as client:
        yield client


# --- N1: archives that inflate ---


@pytest.mark.parametrize(
    "bomb",
    [lambda: sparse_bomb(1 << 30), lambda: pax_sparse_bomb(1 << 30), readme_bomb],
    ids=["gnu-sparse-1GiB", "pax-sparse-1GiB", "readme-declares-300MB"],
)
def test_inflating_archives_are_422_and_cost_little_memory(app: TestClient, bomb: Callable[[], bytes]) -> None:
    """Before the fix the sparse ones raised the process's peak by ~1.07 GB and were accepted by the archive
    layer; the README one read ~60 MB of a file that is then ignored."""
    data = bomb()
    key = create_user(app, f"bomb{len(data)}")
    r, peak = traced_peak(lambda: put(app, f"bomb{len(data)}", key, data))
    assert_json_error(r, 422, "invalid_request")
    assert peak < 50 * MB, f"peak rose by {peak / MB:.1f} MB"


# --- N8: deep JSON ---


@pytest.mark.parametrize(("member", "patch"), [(CONFIG_NAME, nested_config), (WEIGHTS_NAME, nested_header)])
def test_deeply_nested_json_is_422_not_500(app: TestClient, member: str, patch: Callable[[bytes], bytes]) -> None:
    user = f"deep{len(member)}"
    key = create_user(app, user)
    body = assert_json_error(put(app, user, key, _with_member(small_adapter(app_state(app)), member, patch)), 422)
    assert "nested" in body["message"]


# --- N5: downloads and exports behind a gate ---


def test_download_and_export_gate_answers_429_and_frees_its_slots(app: TestClient) -> None:
    """Settings of `app`: 2 downloads/exports at once in all, 1 per user."""
    state = app_state(app)
    keys = {u: create_user(app, u) for u in ("dl1", "dl2", "dl3")}
    for u in keys:
        assert put(app, u, keys[u], small_adapter(state)).status_code == 201
    skey = {u: _storage_key(state, u) for u in keys}
    release = state.downloads.acquire(skey["dl1"])  # dl1 has a download in flight
    try:
        for path in ("/users/dl1/adapter/download", "/users/dl1/export"):
            r = app.get(path, headers=bearer(keys["dl1"]))
            assert_json_error(r, 429, "too_many_requests")
            assert r.headers["Retry-After"]
        assert app.get("/users/dl2/adapter/download", headers=bearer(keys["dl2"])).status_code == 200
        other = state.downloads.acquire(skey["dl2"])  # now 2 in all
        try:
            r = app.get("/users/dl3/export", headers=bearer(keys["dl3"]))
            assert "other downloads" in assert_json_error(r, 429)["message"]
        finally:
            other()
    finally:
        release()
    for path in ("/users/dl1/adapter/download", "/users/dl1/export"):  # sent responses gave their slots back
        assert app.get(path, headers=bearer(keys["dl1"])).status_code == 200
    assert state.downloads.in_use() == 0


def _storage_key(state: AppState, user_id: str) -> str:
    with state.session_factory() as session:
        found = session.scalar(select(User.storage_key).where(User.user_id == user_id))
    assert found is not None
    return found


def test_parallel_downloads_are_streamed_from_disk(tmp_path: Path, tiny_model_path: Path) -> None:
    """6 parallel downloads of a ~16 MB adapter add less than 2x its size to the server process's peak (before:
    each built the zip in memory, ~3x its size each, ~18x in all); a client that leaves mid-download frees
    its slot."""
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    limits = {"download_concurrency": 6, "download_concurrency_per_user": 6}
    settings = make_settings(tmp_path, db, str(tiny_model_path), adapter_max_rank=2048, **limits)
    app = create_app(settings)
    with live_server(app) as base:
        state: AppState = app.state.oppu
        key = _http_user(base, "big")
        body = random_lora_zip(state.adapters.spec.linear_shapes, None, 3, rank=2048, targets=ALL_TARGET_MODULES)
        r = httpx.put(f"{base}/users/big/adapter", content=body, headers=bearer(key), timeout=120)
        assert r.status_code == 201, r.text
        size = int(r.json()["nbytes"])
        assert size > 15 * MB
        digests: list[str] = []

        def download() -> None:
            h = hashlib.sha256()
            with httpx.stream("GET", f"{base}/users/big/adapter/download", headers=bearer(key), timeout=120) as resp:
                assert resp.status_code == 200
                for chunk in resp.iter_bytes(64 * 1024):
                    h.update(chunk)
            digests.append(h.hexdigest())

        def six() -> None:
            threads = [threading.Thread(target=download) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)

        _, peak = traced_peak(six)
        assert len(digests) == 6 and len(set(digests)) == 1
        assert peak < 2 * size, f"6 downloads raised the peak by {peak / MB:.1f} MB (adapter: {size / MB:.1f} MB)"
        # A client that leaves after the first chunk: its slot (and temp file) are given back.
        with httpx.stream("GET", f"{base}/users/big/adapter/download", headers=bearer(key), timeout=60) as resp:
            next(resp.iter_raw(1024))
        _wait_until(lambda: state.downloads.in_use() == 0)


def _wait_until(ok: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _http_user(base: str, user: str) -> str:
    r = httpx.post(f"{base}/admin/users", json={"user_id": user}, headers=ADMIN, timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["api_key"])


# --- N7: stalled upload bodies ---


class RawUpload:
    """An upload over a raw socket: headers and part of the body now, the rest (or nothing) later."""

    def __init__(self, base: str, user: str, key: str, body: bytes, sent: int) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        head = (
            f"PUT /users/{user}/adapter HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/zip\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.body, self.sent = body, sent
        self.sock.sendall(head.encode() + body[:sent])

    def finish(self) -> None:
        self.sock.sendall(self.body[self.sent :])

    def response(self) -> tuple[int, dict[str, Any]]:
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(payload) if payload else {}

    def close(self) -> None:
        self.sock.close()


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
def live(tmp_path: Path, tiny_model_path: Path) -> Iterator[tuple[str, AppState]]:
    """A live server (SQLite) with 2 uploads at once in all, 1 per user, and a 3 s body deadline."""
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    settings = make_settings(tmp_path, db, str(tiny_model_path), upload_body_timeout_s=3.0)
    assert settings.upload_concurrency == 2 and settings.upload_concurrency_per_user == 1
    app = create_app(settings)
    with live_server(app) as base:
        yield base, app.state.oppu


def test_stalled_upload_bodies_hold_no_gate_and_end_at_their_deadline(live: tuple[str, AppState]) -> None:
    """Before: two stalled bodies (2 = OPPU_UPLOAD_CONCURRENCY) held the global upload gate, every other
    upload got 429, for as long as the sockets stayed open."""
    base, state = live
    keys = {u: _http_user(base, u) for u in ("stall1", "stall2", "ok")}
    body = small_adapter(state)
    stalled = [RawUpload(base, u, keys[u], body, 100) for u in ("stall1", "stall2")]
    try:
        time.sleep(0.5)  # both bodies are arriving
        headers = {**bearer(keys["ok"]), "Content-Type": "application/zip"}
        r = httpx.put(f"{base}/users/ok/adapter", content=body, headers=headers, timeout=60)
        assert r.status_code == 201, r.text
        # The same user's second upload while its first body arrives: 429 (one receiving per user).
        again = httpx.put(
            f"{base}/users/stall1/adapter", content=body, headers={**bearer(keys["stall1"])}, timeout=60
        )
        assert_json_error(again, 429)
        started = time.monotonic()
        for upload in stalled:
            status, payload = upload.response()
            assert status == 408 and payload["code"] == "request_timeout", payload
        assert time.monotonic() - started < 6
    finally:
        for upload in stalled:
            upload.close()
    assert state.uploads.in_use() == 0
    r = httpx.put(f"{base}/users/stall1/adapter", content=body, headers=bearer(keys["stall1"]), timeout=60)
    assert r.status_code == 201, r.text


# --- N9: races and faults ---


def test_upload_racing_an_erase_is_404_json(settings: Settings) -> None:
    """The body arrives, the user is erased, then the body ends: before, the insert of the adapter rows for the
    erased user's pk failed its foreign key (IntegrityError) -> 500. Both databases."""
    app = create_app(settings)
    with live_server(app) as base:
        state: AppState = app.state.oppu
        key = _http_user(base, "racer")
        upload = RawUpload(base, "racer", key, small_adapter(state), 100)
        try:
            time.sleep(0.3)  # the request is authorised and its body arriving
            assert httpx.delete(f"{base}/users/racer", headers=ADMIN, timeout=30).status_code == 204
            upload.finish()
            status, payload = upload.response()
        finally:
            upload.close()
        # 410: sealing the files met the erased user's destroyed data key first (crypto-shredding); 404/409: the
        # rows were gone at the insert. Each is this request's JSON error, never a 500.
        answers = {(404, "not_found"), (409, "conflict"), (410, "user_data_erased")}
        assert (status, payload["code"]) in answers, payload
        assert state.uploads.in_use() == 0
        assert not any(state.store.list_versions(k) for k in state.store.list_storage_keys())


def test_disk_full_is_507_and_loses_nothing(app: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the store's file writes, SQLite's "database or disk is full" from the rows or at the commit
    (faults injected: the store's write, the repository's insert, a before_commit hook): 507 JSON
    `insufficient_storage`, the current version and its files untouched, no staged leftovers; once space is
    back the same upload succeeds."""
    state = app_state(app)
    key = create_user(app, "full")
    skey = _storage_key(state, "full")
    assert put(app, "full", key, small_adapter(state, 1)).status_code == 201
    before = app.get("/users/full/adapter/download", headers=bearer(key)).content

    def no_space(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def db_full(*args: object, **kwargs: object) -> None:
        raise OperationalError("INSERT INTO adapters ...", {}, sqlite3.OperationalError("database or disk is full"))

    armed = threading.Event()

    def full_at_commit(session: Session) -> None:  # the rows were written; the commit finds the disk full
        if armed.is_set() and session.info.get(AFTER_ROLLBACK):  # the unit of work that wrote the files
            db_full()

    event.listen(Session, "before_commit", full_at_commit)
    try:
        for fault in ("store", "rows", "commit"):
            _fault_upload_is_507(app, monkeypatch, fault, armed, (no_space, db_full), key)
            _nothing_lost(app, state, key, skey, before)
    finally:
        event.remove(Session, "before_commit", full_at_commit)
    r = put(app, "full", key, small_adapter(state, 2))
    assert r.status_code == 201 and r.json()["version"] >= 2, r.text


def _fault_upload_is_507(
    app: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    armed: threading.Event,
    faults: tuple[Callable[..., None], Callable[..., None]],
    key: str,
) -> None:
    with monkeypatch.context() as m:
        if fault == "store":
            m.setattr(store_module, "_write_fsync", faults[0])
        elif fault == "rows":
            m.setattr(adapter_repo, "add", faults[1])
        else:
            armed.set()
        try:
            r = put(app, "full", key, small_adapter(app_state(app), 2))
        finally:
            armed.clear()
    assert_json_error(r, 507, "insufficient_storage")


def _nothing_lost(app: TestClient, state: AppState, key: str, skey: str, before: bytes) -> None:
    meta = app.get("/users/full/adapter", headers=bearer(key)).json()
    assert meta["version"] == 1, meta
    assert app.get("/users/full/adapter/download", headers=bearer(key)).content == before
    assert state.store.list_versions(skey) == [1]
    assert not any(p.name.startswith("staged-") for p in (state.store.root / "tmp").iterdir())


def test_client_leaving_mid_upload_is_no_unhandled_error(
    live: tuple[str, AppState], caplog: pytest.LogCaptureFixture
) -> None:
    base, state = live
    key = _http_user(base, "leaver")
    body = small_adapter(state)
    with caplog.at_level(logging.WARNING):
        upload = RawUpload(base, "leaver", key, body, 100)
        time.sleep(0.3)
        upload.close()  # gone before the body is in
        time.sleep(1.5)  # the server notices and ends the request
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert state.uploads.in_use() == 0
    r = httpx.put(f"{base}/users/leaver/adapter", content=body, headers=bearer(key), timeout=60)
    assert r.status_code == 201, r.text  # its receiving slot was given back


def test_download_and_export_on_a_full_disk_are_507_and_free_their_slot(
    app: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temp file a download or export is written to hits ENOSPC (injected where the zip is written)."""
    state = app_state(app)
    key = create_user(app, "tmpfull")
    assert put(app, "tmpfull", key, small_adapter(state)).status_code == 201

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_service, "pack_zip_to", no_space)
    monkeypatch.setattr(data_rights, "export_archive", no_space)
    for path in ("/users/tmpfull/adapter/download", "/users/tmpfull/export"):
        assert_json_error(app.get(path, headers=bearer(key)), 507, "insufficient_storage")
        assert state.downloads.in_use() == 0
    monkeypatch.undo()
    assert app.get("/users/tmpfull/adapter/download", headers=bearer(key)).status_code == 200
