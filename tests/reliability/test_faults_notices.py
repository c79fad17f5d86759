"""Notices during a Redis outage reach every replica (issue 23: erase and key revocation reached only the local
replica). Two API apps on one database (SQLite file and PostgreSQL), OPPU_REDIS_URL at a closed port (Redis
unreachable for both from the start): a stream of the user runs on replica B; the erase (or the admin's key
revocation) on replica A ends it within the notices' poll interval, B's engine rows of the user end, and (erase)
B's cached index of the user goes. Also: a notice the fast path applied is not applied again by the poller."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.engine.builtin.engine import BuiltinEngine
from service.main import create_app
from service.state import AppState
from service.tenancy import hash_key
from tests.conftest import admin_headers, bearer, live_server, make_settings
from tests.factories import free_port

SLOW_TICK_S = 0.03  # each engine step takes >= 30 ms: a 500-token stream lasts >= 15 s
POLL_S = 0.25
LONG = {"prompt": "hi", "stream": True, "max_new_tokens": 500, "temperature": 0, "retrieval_k": 2}


@pytest.fixture
def replicas(tmp_path: Path, db_url: str, tiny_model_path: Path) -> Iterator[tuple[TestClient, str, AppState]]:
    """Replica A (a test client) and replica B (a live server, slowed engine), one database and one store, Redis
    unreachable (nothing listens on the port)."""
    settings = make_settings(
        tmp_path, db_url, str(tiny_model_path), redis_url=f"redis://127.0.0.1:{free_port()}/0", notice_poll_s=POLL_S
    )
    app_b = create_app(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as a, live_server(app_b) as base_b:
        state_b: AppState = app_b.state.oppu
        engine = state_b.engine
        assert isinstance(engine, BuiltinEngine)
        tick = engine._tick

        def slow_tick() -> bool:
            time.sleep(SLOW_TICK_S)
            return tick()

        engine._tick = slow_tick  # type: ignore[method-assign]
        yield a, base_b, state_b


def _stream_then(base: str, user: str, key: str, action: threading.Event, done: threading.Event) -> list[str]:
    """Streams on replica B; sets `action` at the first token, returns the lines after it."""
    rest: list[str] = []
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{base}/users/{user}/generate", json=LONG, headers=bearer(key)) as r,
    ):
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:") and '"text": "' in line and '""' not in line:
                break
        action.set()
        rest.extend(line for line in lines if line)
    done.set()
    return rest


@pytest.mark.parametrize("action", ["erase", "revoke"])
def test_a_notice_reaches_the_other_replica_while_redis_is_down(
    replicas: tuple[TestClient, str, AppState], action: str
) -> None:
    a, base_b, state_b = replicas
    created = a.post("/admin/users", json={"user_id": "uma"}, headers=admin_headers()).json()
    key = created["api_key"]
    items = [{"output": f"uma likes hiking trail number {i}"} for i in range(4)]
    assert a.post("/users/uma/history", json={"items": items}, headers=bearer(key)).status_code == 201
    started, ended = threading.Event(), threading.Event()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(_stream_then(base_b, "uma", key, started, ended)))
    reader.start()
    assert started.wait(60), "replica B's stream never produced a token"
    engine = state_b.engine
    assert isinstance(engine, BuiltinEngine)
    tenants = {r.request.tenant for r in engine._running}
    assert len(tenants) == 1
    (tenant,) = tenants
    assert tenant in state_b.bm25._entries  # B indexed the user's history for that request
    if action == "erase":
        assert a.delete("/users/uma", headers=bearer(key)).status_code == 204
    else:
        assert a.post("/admin/users/uma/keys/revoke", headers=admin_headers()).status_code == 200
    acted = time.monotonic()
    assert ended.wait(POLL_S + 3.0), "replica B's stream did not end: the notice never arrived"
    took = time.monotonic() - acted
    reader.join(10)
    print(f"{action} on replica A ended replica B's stream after {took:.3f} s (poll every {POLL_S} s, Redis down)")
    assert took < POLL_S + 1.5, took
    assert any("key_revoked" in line or "user_erased" in line for line in lines), lines[-4:]
    assert not any(line == "event: done" for line in lines)
    deadline = time.monotonic() + 5
    while state_b.engine.stats().running:  # B's row of the user was cancelled, not left to run out
        assert time.monotonic() < deadline, "replica B still runs the user's row"
        time.sleep(0.05)
    if action == "erase":
        assert tenant not in state_b.bm25._entries  # the erased user's index left B's memory too


def test_what_the_fast_path_applied_is_not_applied_again(replicas: tuple[TestClient, str, AppState]) -> None:
    """A revocation made on B reaches B's listener once (its fast path; the poll skips it), one made on A once
    (the poll)."""
    a, base_b, state_b = replicas
    poller = state_b.notices
    assert poller is not None
    seen: list[str] = []
    original = poller._listeners.revoked

    def counting(hashes: list[str]) -> object:
        seen.extend(hashes)
        return original(hashes)

    poller._listeners = replace(poller._listeners, revoked=counting)
    keys = {u: a.post("/admin/users", json={"user_id": u}, headers=admin_headers()).json()["api_key"] for u in "vw"}
    assert a.post("/admin/users/v/keys/revoke", headers=admin_headers()).status_code == 200  # on A
    assert httpx.post(f"{base_b}/admin/users/w/keys/revoke", headers=admin_headers(), timeout=30).status_code == 200
    on_a, on_b = hash_key(keys["v"]), hash_key(keys["w"])
    assert on_b in seen  # B's own revocation: applied at its commit, before any poll
    deadline = time.monotonic() + POLL_S + 3.0
    while on_a not in seen:
        assert time.monotonic() < deadline, "A's revocation never reached B"
        time.sleep(0.05)
    time.sleep(4 * POLL_S)  # more polls: nothing is applied twice
    assert seen.count(on_a) == 1 and seen.count(on_b) == 1, seen
