"""Per-request deadline (504), the docs switch, the context trimmed to fit, request bodies that never arrive."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from service.db.migrate import upgrade
from service.main import create_app
from tests.conftest import admin_headers, bearer, create_user, live_server, make_settings, running_app


def test_deadline_gives_504_and_frees_the_row(tmp_path: Path, tiny_model_path: Path) -> None:
    with running_app(
        tmp_path, tiny_model_path, raise_server_exceptions=True, request_timeout_s=0.3, max_new_tokens_cap=4096
    ) as client:
        key = create_user(client, "slow")
        body = {"prompt": "go on forever", "max_new_tokens": 1900, "temperature": 0, "retrieval_k": 0}
        r = client.post("/users/slow/generate", json=body, headers=bearer(key))
        assert r.status_code == 504 and r.json()["code"] == "timeout"
        quick = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0}
        assert client.post("/users/slow/generate", json=quick, headers=bearer(key)).status_code == 200


def test_docs_can_be_disabled(tmp_path: Path, tiny_model_path: Path) -> None:
    with running_app(tmp_path, tiny_model_path, raise_server_exceptions=True, docs_enabled=False) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
        assert client.get("/healthz").status_code == 200


def test_the_context_the_server_adds_is_trimmed_to_the_models_context(sqlite_client: TestClient) -> None:
    # Retrieved items are capped in characters, and a character can be a token or more (CJK): three ordinary
    # items of a user's history made every default request (retrieval_k=3) 422 prompt_too_long.
    cjk = "".join(chr(0x4E00 + (i * 37) % 20000) for i in range(700))
    key = create_user(sqlite_client, "zh")
    items = [{"output": f"你好 {cjk}"} for _ in range(3)]
    assert sqlite_client.post("/users/zh/history", json={"items": items}, headers=bearer(key)).status_code == 201
    r = sqlite_client.post("/users/zh/generate", json={"prompt": "你好", "max_new_tokens": 1}, headers=bearer(key))
    assert r.status_code == 200, r.text[:400]
    assert len(r.json()["retrieved"]) < 3  # the items that fit, and only those, are listed
    # What the caller sent is never cut: too long alone is still 422.
    long = {"prompt": "你好" * 3000, "max_new_tokens": 1, "retrieval_k": 0}
    assert sqlite_client.post("/users/zh/generate", json=long, headers=bearer(key)).status_code == 422


def test_a_generated_profile_samples_the_latest_items_that_fit_the_context(sqlite_client: TestClient) -> None:
    # 20 items clipped to 300 characters: a CJK history's profile prompt was ~15k tokens against 2048, so such
    # a user could never get a generated profile (422 every time).
    from tests.conftest import admin_headers

    cjk = "".join(chr(0x4E00 + (i * 37) % 20000) for i in range(400))
    key = create_user(sqlite_client, "zhp")
    items = [{"output": f"{i} {cjk}"} for i in range(20)]
    assert sqlite_client.post("/users/zhp/history", json={"items": items}, headers=bearer(key)).status_code == 201
    r = sqlite_client.post("/admin/users/zhp/profile/generate", headers=admin_headers())
    assert r.status_code == 200, r.text[:300]
    assert r.json()["source"] == "generated"


def _slow_body(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A client with no key that declares a 100-byte JSON body, sends `{`, and waits."""
    conn = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    head = b"POST /admin/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    conn.sendall(head + b"{")
    return conn


def test_bodies_that_never_arrive_hold_no_request_place(tmp_path: Path, tiny_model_path: Path) -> None:
    """Clients with no key sending a body slowly (`{`, then nothing) each held one of OPPU_MAX_CONCURRENCY
    places until the body deadline (FastAPI reads the body before the route authenticates): 4 of them made a
    replica with 4 places answer 503 to every tenant. A body is now read whole before the request counts; a
    client has at most max_concurrency / 4 bodies arriving at once (429 beyond), the slow ones end in 408."""
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    app = create_app(make_settings(tmp_path, db, str(tiny_model_path), max_concurrency=4, body_timeout_s=3.0))
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        r = httpx.post(f"{base}/admin/users", json={"user_id": "alice"}, headers=admin_headers(), timeout=30)
        key = r.json()["api_key"]
        slow = [_slow_body(port, "127.0.0.2") for _ in range(6)]  # one address: 1 body arriving (4 // 4)
        time.sleep(0.5)
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.1"), timeout=30)
        assert other.get(f"{base}/users/alice/history", headers=bearer(key)).status_code == 200
        append = {"items": [{"input": "a", "output": "b"}]}
        for _ in range(6):  # more requests with bodies than places, from another address: none refused
            r = other.post(f"{base}/users/alice/history", json=append, headers=bearer(key))
            assert r.status_code == 201, r.text
        answers = [conn.recv(200).split(b"\r\n", 1)[0] for conn in slow]
        assert sorted(answers) == [b"HTTP/1.1 408 Request Timeout"] + [b"HTTP/1.1 429 Too Many Requests"] * 5
        for conn in slow:
            conn.close()
        other.close()
