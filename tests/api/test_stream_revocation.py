"""Revoking or rotating a key ends the streams started with it at once (an in-band key_revoked error, then
the end of the stream), on /generate and on the OpenAI routes; the rows are cancelled, other callers' streams
go on. A real uvicorn server: the test client would buffer the whole stream."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import httpx
import pytest

from service import data_rights
from service.adapters import service as adapters_service
from service.adapters import uploads
from service.db.migrate import upgrade
from service.engine.builtin.engine import BuiltinEngine
from service.main import create_app
from service.state import AppState
from service.streams import StreamRegistry
from service.tenancy import hash_key
from tests.conftest import ADMIN_KEY, app_state, bearer, create_user, live_server, make_settings, running_app
from tests.factories import random_lora_zip, upload

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SLOW_TICK_S = 0.03  # each engine step takes >= 30 ms: a 500-token stream lasts >= 15 s
LONG = {"max_new_tokens": 500, "temperature": 0}


@pytest.fixture
def server(tmp_path: Path, tiny_model_path: Path) -> Iterator[tuple[str, AppState]]:
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    app = create_app(make_settings(tmp_path, db, str(tiny_model_path)))
    with live_server(app) as base:
        state: AppState = app.state.oppu
        engine = state.engine
        assert isinstance(engine, BuiltinEngine)
        tick = engine._tick

        def slow_tick() -> bool:
            time.sleep(SLOW_TICK_S)
            return tick()

        engine._tick = slow_tick  # type: ignore[method-assign]
        yield base, state


RECOVERY: dict[str, str] = {}  # user id -> recovery code (an owner's own rotation needs it)


def new_user(base: str, user_id: str) -> str:
    r = httpx.post(f"{base}/admin/users", json={"user_id": user_id}, headers=ADMIN, timeout=30)
    assert r.status_code == 201, r.text
    RECOVERY[user_id] = str(r.json()["recovery_code"])
    return str(r.json()["api_key"])


def read_after_revoke(base: str, path: str, body: dict[str, object], key: str, revoke: str) -> tuple[list[str], float]:
    """Open the stream, read until its first token, then call `revoke`; every line after, and how long after the
    revocation the stream ended."""
    with httpx.Client(timeout=60) as http, http.stream("POST", base + path, json=body, headers=_bearer(key)) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:") and ('"text": "' in line or '"content": "' in line) and '""' not in line:
                break
        if revoke == "rotate":
            user = path.split("/")[2] if path.startswith("/users/") else "alice"
            body = {"recovery_code": RECOVERY[user]}
            rotated = httpx.post(f"{base}/users/{user}/keys/rotate", json=body, headers=_bearer(key), timeout=30)
            assert rotated.status_code == 200, rotated.text
        else:
            assert httpx.post(f"{base}/admin/users/alice/keys/revoke", headers=ADMIN, timeout=30).status_code == 200
        revoked_at = time.monotonic()
        rest = [line for line in lines if line]
        return rest, time.monotonic() - revoked_at


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("revoke", ["rotate", "admin"])
def test_generate_stream_ends_when_its_key_is_revoked(server: tuple[str, AppState], revoke: str) -> None:
    base, state = server
    key = new_user(base, "alice")
    rest, took = read_after_revoke(base, "/users/alice/generate", {"prompt": "hi", "stream": True, **LONG}, key, revoke)
    assert took < 2.0, took
    errors = [json.loads(rest[i + 1][5:]) for i, line in enumerate(rest) if line == "event: error"]
    assert errors == [{"code": "key_revoked", "message": "the API key was revoked"}], rest[-4:]
    assert not any(line == "event: done" for line in rest)
    assert len([line for line in rest if line.startswith("data:")]) < 200  # ended long before 500 tokens
    _until(lambda: state.engine.stats().running == 0)  # the row was cancelled
    r = httpx.post(f"{base}/users/alice/generate", json={"prompt": "hi"}, headers=_bearer(key), timeout=30)
    assert r.status_code == 401


def test_openai_stream_ends_but_other_callers_go_on(server: tuple[str, AppState]) -> None:
    base, state = server
    key = new_user(base, "alice")
    bob = new_user(base, "bob")
    bob_lines: list[str] = []

    def bob_stream() -> None:
        body = {"model": "personal", "prompt": "hey", "stream": True, "max_tokens": 150, "temperature": 0}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=_bearer(bob), timeout=60) as r:
            bob_lines.extend(line for line in r.iter_lines() if line)

    other = threading.Thread(target=bob_stream)
    other.start()
    body = {"model": "personal", "messages": [{"role": "user", "content": "hi"}], "stream": True, "ignore_eos": True}
    rest, took = read_after_revoke(base, "/v1/chat/completions", {**body, "max_tokens": 500}, key, "admin")
    other.join(60)
    assert took < 2.0, took
    assert rest[-1] == "data: [DONE]"
    revoked: dict[str, str | None] = {"code": "key_revoked", "message": "the API key was revoked"}
    revoked |= {"type": "authentication_error", "param": None}  # OpenAI's error object
    assert json.loads(rest[-2][5:]) == {"error": revoked}
    # bob's stream, running alongside, is whole: 150 tokens of text chunks, a finish reason, [DONE]
    assert bob_lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in bob_lines)
    finishes = [json.loads(line[5:])["choices"][0]["finish_reason"] for line in bob_lines[:-1]]
    assert finishes[-1] in {"length", "stop"}
    _until(lambda: state.engine.stats().running == 0)


def test_registry_ends_a_stream_that_waits_and_leaves_admin_streams_alone() -> None:
    async def never() -> AsyncIterator[None]:
        await asyncio.sleep(3600)
        yield None

    async def run() -> None:
        streams = StreamRegistry()
        watched = streams.guard("h1", never())
        admin = streams.guard(None, never())
        task = asyncio.ensure_future(anext(watched))
        admin_task = asyncio.ensure_future(anext(admin))
        await asyncio.sleep(0.05)
        assert streams.revoke(["h1", "h2"]) == 1
        started = time.monotonic()
        with pytest.raises(Exception, match="revoked") as caught:
            await task
        assert getattr(caught.value, "code", None) == "key_revoked"
        assert time.monotonic() - started < 1.0
        assert not admin_task.done()
        admin_task.cancel()
        assert streams.revoke(["h1"]) == 0  # gone from the registry once ended

    asyncio.run(run())


def _until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


# --- erase is final at once (issue 23 N2) ---


def first_token_then(base: str, key: str, act: Callable[[], None]) -> tuple[list[str], float]:
    body = {"prompt": "hi", "stream": True, **LONG}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{base}/users/alice/generate", json=body, headers=_bearer(key)) as r,
    ):
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:") and '"text": "' in line and '""' not in line:
                break
        act()
        acted_at = time.monotonic()
        rest = [line for line in lines if line]
        return rest, time.monotonic() - acted_at


@pytest.mark.parametrize("who", ["self", "admin"])
def test_erase_ends_the_users_stream_within_a_second(server: tuple[str, AppState], who: str) -> None:
    base, state = server
    key = new_user(base, "alice")
    headers = _bearer(key) if who == "self" else ADMIN

    def erase() -> None:
        assert httpx.delete(f"{base}/users/alice", headers=headers, timeout=30).status_code == 204

    rest, took = first_token_then(base, key, erase)
    assert took < 1.0, took
    errors = [json.loads(rest[i + 1][5:])["code"] for i, line in enumerate(rest) if line == "event: error"]
    assert errors and errors[0] in {"key_revoked", "user_erased"}, rest[-4:]
    assert len([line for line in rest if line.startswith("data:")]) < 100
    _until(lambda: state.engine.stats().running == 0)


def test_erase_ends_the_users_non_streaming_request_with_its_error(server: tuple[str, AppState]) -> None:
    base, state = server
    key = new_user(base, "alice")
    answer: list[httpx.Response] = []
    body = {"prompt": "hi", **LONG}
    worker = threading.Thread(
        target=lambda: answer.append(
            httpx.post(f"{base}/users/alice/generate", json=body, headers=_bearer(key), timeout=60)
        )
    )
    worker.start()
    _until(lambda: state.engine.stats().running == 1)
    time.sleep(0.3)  # a few tokens in
    assert httpx.delete(f"{base}/users/alice", headers=ADMIN, timeout=30).status_code == 204
    erased_at = time.monotonic()
    worker.join(30)
    took = time.monotonic() - erased_at
    assert took < 1.0, took
    assert answer[0].status_code == 401 and answer[0].json()["code"] == "user_erased", answer[0].text


# --- downloads and exports end too: a revoked key (rotation, erase) gets no more of the file ---


@pytest.mark.parametrize("spec", ["2.3", "2.4"])  # uvicorn's is 2.3: Starlette listens for a disconnect beside
def test_a_file_being_sent_stops_once_its_event_is_set_and_frees_its_slot(spec: str) -> None:
    """Past the headers, the rest of the file is not sent: the response returns before its last body message
    (the server closes the connection: the client sees a short body), the slot is free, the file closed."""
    size = 8 * uploads.CHUNK
    file = io.BytesIO(os.urandom(size))
    gate = uploads.UploadGate(total=2, per_user=1, what="download")
    ended = threading.Event()
    response = uploads.gated_file(gate, "u1", lambda out: _copy(file, out), ends=nullcontext(ended))
    assert gate.in_use() == 1
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            ended.set()  # revoked after the first chunk went out

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "asgi": {"spec_version": spec}}
    asyncio.run(response(scope, receive, send))  # type: ignore[arg-type]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert sum(len(m.get("body", b"")) for m in bodies) == uploads.CHUNK < size
    assert all(m.get("more_body") for m in bodies)  # never a last body message: not a whole response
    assert gate.in_use() == 0
    assert response._done.alive is False  # its temp file closed, its watch left


def _copy(src: io.BytesIO, out: IO[bytes]) -> str:
    out.write(src.getvalue())
    return "f.zip"


@pytest.mark.parametrize("route", ["export", "adapter"])
def test_a_key_revoked_while_its_download_is_written_gets_401(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """The export and the adapter download watch the caller's key from before the file is written: revoked
    meanwhile (the admin's revoke, an erase), the answer is 401 key_revoked, not the file."""
    with running_app(tmp_path, tiny_model_path) as client:
        key = create_user(client, "alice")
        state = app_state(client)
        streams = state.streams
        target: ModuleType
        if route == "adapter":
            r = upload(client, "alice", key, random_lora_zip(state.adapters.spec.linear_shapes, None, seed=1))
            assert r.status_code == 201, r.text
            target, path = adapters_service, "/users/alice/adapter/download"
            name = "download"
        else:
            target, path, name = data_rights, "/users/alice/export", "export_archive"
        original = getattr(target, name)

        def write_then_revoke(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            assert streams.revoke([hash_key(key)]) == 1  # the route watches the caller's key
            return result

        monkeypatch.setattr(target, name, write_then_revoke)
        r = client.get(path, headers=bearer(key))
        assert r.status_code == 401 and r.json()["code"] == "key_revoked", r.text
        assert state.downloads.in_use() == 0
        monkeypatch.setattr(target, name, original)
        other = create_user(client, "bob")  # only the revoked key's transfers end
        other_path = path.replace("alice", "bob")
        if route == "adapter":
            r = upload(client, "bob", other, random_lora_zip(state.adapters.spec.linear_shapes, None, seed=2))
            assert r.status_code == 201, r.text
        assert client.get(other_path, headers=bearer(other)).status_code == 200


# --- a key revoked between its request's authentication and its stream's start ---


def test_a_stream_that_starts_after_its_keys_revocation_ends_at_once() -> None:
    streams = StreamRegistry(remember_s=0.2)
    assert streams.revoke(["h1"]) == 0  # nothing live yet
    with streams.watch("h1") as late, streams.watch("h2") as other:
        assert late.is_set() and not other.is_set()
    time.sleep(0.3)
    with streams.watch("h1") as much_later:  # forgotten after remember_s (a request's longest life)
        assert not much_later.is_set()


def test_a_key_revoked_while_its_request_is_prepared_gets_no_stream(
    server: tuple[str, AppState], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request was authenticated, then waited (the preparation gate, retrieval) while its key was revoked:
    its stream ran to its end on the dead key; now it ends with key_revoked at its first event."""
    base, state = server
    key = new_user(base, "alice")
    prepare = state.preparer.prepare
    preparing = threading.Event()

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        preparing.set()
        time.sleep(1.0)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(state.preparer, "prepare", slow_prepare)
    revoker = threading.Thread(
        target=lambda: preparing.wait(10)
        and httpx.post(f"{base}/admin/users/alice/keys/revoke", headers=ADMIN, timeout=30)
    )
    revoker.start()
    body = {"prompt": "hi", "stream": True, **LONG}
    with httpx.stream("POST", f"{base}/users/alice/generate", json=body, headers=_bearer(key), timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    revoker.join(10)
    errors = [json.loads(lines[i + 1][5:]) for i, line in enumerate(lines) if line == "event: error"]
    assert errors == [{"code": "key_revoked", "message": "the API key was revoked"}], lines[-4:]
    assert len([line for line in lines if line.startswith("data:")]) < 20
    _until(lambda: state.engine.stats().running == 0)
