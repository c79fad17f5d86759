"""service/users.py under concurrency: two rotations of one user's key at once end with one live key (PostgreSQL's
read committed); owner rotations racing with one recovery code let exactly one through (SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service import users
from service.accounts import repository as accounts
from service.db.models import ApiKey
from service.db.session import make_engine, make_session_factory, unit_of_work
from service.main import create_app
from service.sealing.session import session_info
from service.tenancy import UserRef, hash_key, recovery_code_matches
from tests.conftest import admin_headers, bearer, live_server, make_settings
from tests.factories import make_sealer


@pytest.fixture
def factory(db_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_session_factory(engine, session_info(make_sealer(tmp_path / "keyring")))
    engine.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite runs one writer at a time anyway
def test_two_admin_rotations_at_once_leave_exactly_one_live_key(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        user, _ = users.create_user(session, "rita")
    second_done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with unit_of_work(factory) as session:
                users.rotate_key(session, user, by_admin=True)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        second_done.set()

    with unit_of_work(factory) as session:
        users.rotate_key(session, user, by_admin=True)  # not committed yet when the second one starts
        thread = threading.Thread(target=second)
        thread.start()
        assert not second_done.wait(0.5)  # it waits for this rotation (before the fix it went on: 2 live keys)
    thread.join(30)
    assert not errors and second_done.is_set()
    with unit_of_work(factory) as session:
        live = select(func.count()).select_from(ApiKey).where(ApiKey.user_pk == user.pk, ApiKey.revoked_at.is_(None))
        assert session.scalar(live) == 1


def _rotate_concurrently(factory: sessionmaker[Session], user: UserRef, code: str, n: int) -> list[object]:
    """n owner rotations with the same recovery code at once, each in its own thread and unit of work: every one
    has read the stored hash before any writes (a barrier after the read); the result of each (NewKey or error)."""
    results: list[object] = [None] * n

    def rotate(i: int) -> None:
        try:
            with unit_of_work(factory) as session:
                results[i] = users.rotate_key(session, user, recovery_code=code)
        except BaseException as exc:  # reported by the caller's assertions
            results[i] = exc

    threads = [threading.Thread(target=rotate, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_owner_rotations_with_one_recovery_code_let_exactly_one_through(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite ignores FOR UPDATE: 4 rotations with the same code all read the same hash, all passed, each handed
    # out a key (only the last stayed live) and a recovery code (only the last one works).
    with unit_of_work(factory) as session:
        user, _ = users.create_user(session, "rita")
        code = users.issue_recovery_code(session, user)
    barrier = threading.Barrier(4, timeout=3)
    real_read = accounts.recovery_hash

    def read_then_wait(*args: Any, **kwargs: Any) -> str | None:
        stored = real_read(*args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):  # a database that blocks the read: no barrier
            barrier.wait()
        return stored

    monkeypatch.setattr(accounts, "recovery_hash", read_then_wait)
    results = _rotate_concurrently(factory, user, code, 4)
    won = [r for r in results if isinstance(r, users.NewKey)]
    assert len(won) == 1, results
    assert all(isinstance(r, users.ReauthRequired) for r in results if r is not won[0]), results
    with unit_of_work(factory) as session:  # the winner's key and code are the live ones
        assert accounts.user_by_key_hash(session, hash_key(won[0].api_key)) is not None
        live = select(func.count()).select_from(ApiKey).where(ApiKey.user_pk == user.pk, ApiKey.revoked_at.is_(None))
        assert session.scalar(live) == 1
        assert recovery_code_matches(accounts.recovery_hash(session, user.pk), won[0].recovery_code)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_concurrent_rotate_requests_with_one_code_give_one_200(
    db_url: str, tmp_path: Path, tiny_model_path: Path
) -> None:
    """The reviewer's reproduction over HTTP (a real server, 4 requests at once, 10 times; before the fix 29 of 30
    rounds gave more than one 200): one 200, the others 403 reauth_required (or 401: their key was already revoked),
    and the key handed out is the live one."""
    app = create_app(make_settings(tmp_path, db_url, str(tiny_model_path)))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        r = http.post("/admin/users", json={"user_id": "rita"}, headers=admin_headers())
        key, code = r.json()["api_key"], r.json()["recovery_code"]
        for _ in range(10):
            rotate = functools.partial(
                http.post, "/users/rita/keys/rotate", json={"recovery_code": code}, headers=bearer(key)
            )
            with ThreadPoolExecutor(4) as pool:
                answers = [f.result() for f in [pool.submit(rotate) for _ in range(4)]]
            statuses = [a.status_code for a in answers]
            # 401: authenticated after the winner's commit had revoked the key
            assert statuses.count(200) == 1 and set(statuses) <= {200, 401, 403}, [a.text for a in answers]
            assert all(a.json()["code"] == "reauth_required" for a in answers if a.status_code == 403)
            won = next(a.json() for a in answers if a.status_code == 200)
            key, code = won["api_key"], won["recovery_code"]
            assert http.get("/users/rita/history", headers=bearer(key)).status_code == 200
