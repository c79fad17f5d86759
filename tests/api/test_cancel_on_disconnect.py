"""A client that leaves ends its engine rows, on every generating route, streaming or not
(`middleware.CancelOnDisconnect`): the route matrix, and the abandoned-requests scenario of an OpenAI SDK
client that times out (another user's short request then runs in about its idle time, not behind the
abandoned rows). A real uvicorn server: the test client cannot disconnect."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from service import deps
from service.db.migrate import upgrade
from service.db.session import unit_of_work
from service.deps import get_preparer
from service.engine.builtin.engine import BuiltinEngine
from service.engine.builtin.scheduler import Row
from service.history import service as history_service
from service.main import create_app
from service.state import AppState
from tests.conftest import ADMIN_KEY, live_server, make_settings

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = "leaver"
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 120  # several prefill steps


@dataclass(frozen=True)
class Call:
    path: str
    body: dict[str, Any]
    admin: bool = False


def _gen(stream: bool) -> Call:
    return Call(f"/users/{USER}/generate", {"prompt": "a long story", "max_new_tokens": 400, "stream": stream})


def _v1(route: str, stream: bool) -> Call:
    body: dict[str, Any] = {"model": "personal", "max_tokens": 400, "ignore_eos": True, "stream": stream}
    if route == "chat":
        return Call("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "a long story"}]})
    return Call("/v1/completions", {**body, "prompt": "Once upon a time"})


# Every route that reaches the engine (it takes deps.PreparerDep), with requests that keep rows busy for long.
MATRIX: dict[str, list[Call]] = {
    "/users/{user_id}/generate": [_gen(False), _gen(True)],
    "/users/{user_id}/score": [Call(f"/users/{USER}/score", {"prompt": LONG_PROMPT, "candidates": ["yes", "no"]})],
    "/v1/chat/completions": [_v1("chat", False), _v1("chat", True)],
    "/v1/completions": [_v1("text", False), _v1("text", True)],
    "/admin/users/{user_id}/profile/generate": [Call(f"/admin/users/{USER}/profile/generate", {}, admin=True)],
}


def _uses(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(d.call is call or _uses(d, call) for d in dependant.dependencies)


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (router := getattr(route, "original_router", None)) is not None:  # an included router
            yield from _api_routes(list(router.routes))


def test_the_matrix_names_every_generating_route(tmp_path: Path, tiny_model_path: Path) -> None:
    """A new route that takes the preparer must be added to MATRIX (and so be tested below)."""
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite3'}", str(tiny_model_path)))
    generating = {r.path for r in _api_routes(list(app.routes)) if _uses(r.dependant, get_preparer)}
    assert generating == set(MATRIX), generating ^ set(MATRIX)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[tuple[str, AppState, str]]:
    tmp = tmp_path_factory.mktemp("leave")
    db = f"sqlite:///{tmp / 'db.sqlite3'}"
    upgrade(db)
    app = create_app(make_settings(tmp, db, str(tiny_model_path), batch_max_size=4, max_batch_tokens=256))
    with live_server(app) as base:
        state: AppState = app.state.oppu
        r = httpx.post(f"{base}/admin/users", json={"user_id": USER}, headers=ADMIN, timeout=30)
        key = str(r.json()["api_key"])
        items = [{"id": f"i{i}", "input": f"item {i}", "output": f"liked it {i}"} for i in range(3)]
        r = httpx.post(f"{base}/users/{USER}/history", json={"items": items}, headers=_bearer(key), timeout=30)
        assert r.status_code == 201, r.text
        yield base, state, key


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _engine(state: AppState) -> BuiltinEngine:
    engine = state.engine
    assert isinstance(engine, BuiltinEngine)
    return engine


def _slow(engine: BuiltinEngine, seconds: float) -> Callable[[], None]:
    """Each engine step takes >= `seconds`; returns the undo."""
    tick = engine._tick

    def slow_tick() -> bool:
        time.sleep(seconds)
        return tick()

    engine._tick = slow_tick  # type: ignore[method-assign]

    def undo() -> None:
        del engine._tick

    return undo


def _recording(engine: BuiltinEngine) -> tuple[list[Row], Callable[[], None]]:
    rows: list[Row] = []
    submit = engine.submit

    def record(row: Row) -> None:
        rows.append(row)
        submit(row)

    engine.submit = record  # type: ignore[method-assign]

    def undo() -> None:
        del engine.submit

    return rows, undo


@contextmanager
def _posted(base: str, path: str, body: dict[str, Any], token: str) -> Iterator[None]:
    """A POST sent whole on a raw socket; the connection closes (the client leaves) when the block ends."""
    url = urlsplit(base)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=10) as sock:
        sock.sendall(head + data)
        yield


def _send_then_leave(base: str, call: Call, key: str, engine: BuiltinEngine) -> None:
    """Send the request on a raw socket, wait until its row runs, then close the connection."""
    with _posted(base, call.path, call.body, ADMIN_KEY if call.admin else key):
        deadline = time.monotonic() + 20
        while not engine.stats().running:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)
        time.sleep(0.2)


def _matrix_calls() -> list[tuple[str, Call]]:
    return [(route, call) for route, calls in MATRIX.items() for call in calls]


@pytest.mark.parametrize(
    ("route", "call"), _matrix_calls(), ids=[f"{c.path}:{c.body.get('stream', False)}" for _, c in _matrix_calls()]
)
def test_leaving_cancels_the_rows(server: tuple[str, AppState, str], route: str, call: Call) -> None:
    base, state, key = server
    engine = _engine(state)
    undo_slow = _slow(engine, 0.15)  # 400 tokens would take a minute
    rows, undo_record = _recording(engine)
    try:
        _send_then_leave(base, call, key, engine)
        left = time.monotonic()
        while engine.stats().running or engine.stats().waiting:
            assert time.monotonic() - left < 3, f"{route}: rows still running after the client left"
            time.sleep(0.02)
        assert rows and all(r.cancelled.is_set() for r in rows), f"{route}: the row ended without a cancel"
        assert all(len(r.output) < 100 for r in rows)
    finally:
        undo_record()
        undo_slow()


def _calls(kind: str, user_id: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """One non-streaming request of `kind` for `user_id` (the /v1 routes name the caller's own adapter)."""
    if kind == "generate":
        return f"/users/{user_id}/generate", {"prompt": "a long story", "max_new_tokens": max_tokens}
    body: dict[str, Any] = {"model": "personal", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    if kind == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "a long story"}]}
    return "/v1/completions", {**body, "prompt": "a long story"}


def _new_user(base: str, user_id: str) -> str:
    r = httpx.post(f"{base}/admin/users", json={"user_id": user_id}, headers=ADMIN, timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["api_key"])


@pytest.mark.parametrize("kind", ["completions", "chat", "generate"])
def test_abandoned_requests_do_not_hold_other_users(server: tuple[str, AppState, str], kind: str) -> None:
    """User A sends as many 480-token requests as there are rows and gives up after 1.5 s (an SDK timeout);
    user B's 8-token request then takes about its idle time (before: 56 s, or 504 on chat)."""
    base, state, _ = server
    engine = _engine(state)
    a_id, b_id = f"impatient-{kind}", f"patient-{kind}"
    a_key, b_key = _new_user(base, a_id), _new_user(base, b_id)

    def b_request() -> float:
        path, body = _calls(kind, b_id, 8)
        started = time.monotonic()
        r = httpx.post(base + path, json=body, headers=_bearer(b_key), timeout=120)
        assert r.status_code == 200, r.text
        return time.monotonic() - started

    undo = _slow(engine, 0.03)  # a 480-token row runs >= 14 s
    try:
        idle = b_request()
        path, body = _calls(kind, a_id, 480)
        for _ in range(4):  # batch_max_size rows
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(base + path, json=body, headers=_bearer(a_key), timeout=1.5)
        after = b_request()
    finally:
        undo()
    assert after < idle + 2.0, (kind, idle, after)


def test_leaving_a_plain_route_keeps_its_session_until_the_route_has_ended(
    server: tuple[str, AppState, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `def` route runs in a worker thread. When its client left, the cancelled request used to go on at
    once, tearing its unit of work down (rollback, close) from another thread while the route still used the
    session: a SQLite connection closed mid-insert, and other users' appends waited 30 s on its write lock or
    got 500. The request now waits the thread out (api/routing.WholeThreadRoute)."""
    base, _state, key = server
    events: dict[str, float] = {}
    closed: dict[int, float] = {}  # the request's own unit of work (auth runs units of its own)
    route_session: list[int] = []
    started = threading.Event()
    real_append, real_unit = history_service.append, unit_of_work

    def slow_append(session: Session, *args: Any, **kwargs: Any) -> Any:
        route_session.append(id(session))
        started.set()
        time.sleep(0.6)  # the client leaves meanwhile
        try:
            return real_append(session, *args, **kwargs)
        finally:
            events["route_ended"] = time.monotonic()

    @contextmanager
    def timed_unit(factory: Any) -> Iterator[Session]:
        session = None
        try:
            with real_unit(factory) as session:
                yield session
        finally:
            closed[id(session)] = time.monotonic()

    monkeypatch.setattr(history_service, "append", slow_append)
    monkeypatch.setattr(deps, "unit_of_work", timed_unit)
    with _posted(base, f"/users/{USER}/history", {"items": [{"id": "left-1", "output": "x"}]}, key):
        assert started.wait(10)
    deadline = time.monotonic() + 5
    while not ("route_ended" in events and route_session[0] in closed):
        assert time.monotonic() < deadline, (events, closed)
        time.sleep(0.02)
    assert closed[route_session[0]] >= events["route_ended"], (closed, events)
    monkeypatch.undo()
    r = httpx.post(
        f"{base}/users/{USER}/history", json={"items": [{"id": "after", "output": "y"}]}, headers=_bearer(key)
    )
    assert r.status_code == 201, r.text
