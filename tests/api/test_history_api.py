"""History and profile through HTTP, on SQLite and the real PostgreSQL: idempotent appends, pagination,
profiles, user deletion, concurrent appends."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from service.db.migrate import upgrade
from service.history import service
from service.main import create_app
from tests.conftest import _pg_fresh_schema_url, admin_headers, bearer, create_user, make_settings, running_app


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> Iterator[TestClient]:
    """One app per database for this module (app start-up dominates otherwise); rows are wiped per test."""
    tmp = tmp_path_factory.mktemp(f"history-{request.param}")
    urls = iter([f"sqlite:///{tmp / 'db.sqlite3'}"]) if request.param == "sqlite" else _pg_fresh_schema_url()
    for url in urls:
        upgrade(url)
        with TestClient(create_app(make_settings(tmp, url, str(tiny_model_path))), raise_server_exceptions=False) as c:
            yield c


@pytest.fixture(autouse=True)
def _empty_database(client: TestClient) -> Iterator[None]:
    yield
    with engine_of(client).begin() as conn:
        conn.execute(text("DELETE FROM users"))  # every per-user row goes by ON DELETE CASCADE


def engine_of(client: TestClient) -> Engine:
    engine: Engine = client.app.state.oppu.db.engine  # type: ignore[attr-defined]
    return engine


def user_pk(client: TestClient, user_id: str) -> int | None:
    with engine_of(client).connect() as conn:
        pk = conn.execute(text("SELECT id FROM users WHERE user_id = :u"), {"u": user_id}).scalar()
    return None if pk is None else int(pk)


def sql_count(client: TestClient, table: str, pk: int) -> int:
    column = "user_pk" if table != "users" else "id"
    with engine_of(client).connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table} WHERE {column} = :pk"), {"pk": pk}).scalar_one())


def all_pages(client: TestClient, user_id: str, key: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        r = client.get(f"/users/{user_id}/history", params=params, headers=bearer(key))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) <= limit
        items.extend(body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages
        assert pages < 10_000


def append(client: TestClient, user_id: str, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    r = client.post(f"/users/{user_id}/history", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    assert body["added"] + body["duplicates"] == len(items)
    assert len(body["ids"]) == len(items)
    return body


def test_same_100_ids_three_times_leaves_100_rows(client: TestClient) -> None:
    key = create_user(client, "alice")
    items = [{"id": f"c{i:03d}", "output": f"item {i}"} for i in range(100)]
    first = append(client, "alice", key, items)
    assert (first["added"], first["duplicates"]) == (100, 0)
    assert first["ids"] == [i["id"] for i in items]
    for _ in range(2):
        again = append(client, "alice", key, items)
        assert (again["added"], again["duplicates"]) == (0, 100)
        assert again["ids"] == first["ids"]
    listed, _ = all_pages(client, "alice", key, limit=30)
    assert [i["id"] for i in listed] == [i["id"] for i in items]
    pk = user_pk(client, "alice")
    assert pk is not None and sql_count(client, "history_items", pk) == 100


def test_duplicates_keep_the_first_version(client: TestClient) -> None:
    key = create_user(client, "alice")
    append(client, "alice", key, [{"id": "x", "output": "first"}])
    body = append(client, "alice", key, [{"id": "x", "output": "second"}, {"id": "y", "output": "new"}])
    assert (body["added"], body["duplicates"]) == (1, 1)
    listed, _ = all_pages(client, "alice", key, limit=10)
    assert [(i["id"], i["output"]) for i in listed] == [("x", "first"), ("y", "new")]


def test_items_without_client_id_are_always_added(client: TestClient) -> None:
    key = create_user(client, "alice")
    items = [{"output": "same text"}, {"output": "same text"}]
    one = append(client, "alice", key, items)
    two = append(client, "alice", key, items)
    assert one["added"] == two["added"] == 2 and one["duplicates"] == two["duplicates"] == 0
    generated = one["ids"] + two["ids"]
    assert len(set(generated)) == 4  # server-made ids are unique
    listed, _ = all_pages(client, "alice", key, limit=100)
    assert [i["id"] for i in listed] == generated


def test_same_id_twice_in_one_request_counts_once(client: TestClient) -> None:
    key = create_user(client, "alice")
    body = append(
        client,
        "alice",
        key,
        [
            {"id": "a", "output": "one"},
            {"id": "a", "output": "two"},
            {"id": "b", "output": "three"},
        ],
    )
    assert (body["added"], body["duplicates"]) == (2, 1)
    assert body["ids"] == ["a", "a", "b"]
    listed, _ = all_pages(client, "alice", key, limit=100)
    assert [(i["id"], i["output"]) for i in listed] == [("a", "one"), ("b", "three")]


def test_client_ids_are_per_user(client: TestClient) -> None:
    keys = {u: create_user(client, u) for u in ("alice", "bob")}
    items = [{"id": "shared-id", "output": "mine"}]
    assert append(client, "alice", keys["alice"], items)["added"] == 1
    assert append(client, "bob", keys["bob"], items)["added"] == 1  # not a duplicate of Alice's


def test_pagination_returns_every_item_once_in_order(client: TestClient) -> None:
    key = create_user(client, "alice")
    expected: list[str] = []
    for batch in range(3):
        items: list[dict[str, Any]] = [  # what append() takes
            {
                "id": f"p{batch}-{i}",
                "output": f"o {batch} {i}",
                "input": "q",
                "kind": "review",
                "metadata": {"n": i},
                "timestamp": "2024-05-01T12:00:00+02:00",
            }
            for i in range(83)
        ]
        append(client, "alice", key, items)
        expected += [i["id"] for i in items]
    for limit in (1, 7, 83, 249, 1000):
        listed, pages = all_pages(client, "alice", key, limit=limit)
        assert [i["id"] for i in listed] == expected, limit
        assert pages == -(-len(expected) // limit) or (len(expected) % limit == 0 and pages == len(expected) // limit)
    first = listed[0]
    assert (first["input"], first["kind"], first["metadata"]) == ("q", "review", {"n": 0})
    assert first["timestamp"].startswith("2024-05-01T10:00:00")  # stored in UTC


def test_exact_multiple_of_limit_has_no_empty_last_page(client: TestClient) -> None:
    key = create_user(client, "alice")
    append(client, "alice", key, [{"id": str(i), "output": "o"} for i in range(20)])
    r = client.get("/users/alice/history", params={"limit": 10}, headers=bearer(key)).json()
    r2 = client.get("/users/alice/history", params={"limit": 10, "cursor": r["next_cursor"]}, headers=bearer(key))
    assert len(r2.json()["items"]) == 10 and r2.json()["next_cursor"] is None


def test_empty_history(client: TestClient) -> None:
    key = create_user(client, "alice")
    r = client.get("/users/alice/history", headers=bearer(key))
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}


def test_profile_put_get(client: TestClient) -> None:
    key = create_user(client, "alice")
    r = client.get("/users/alice/profile", headers=bearer(key))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = client.put("/users/alice/profile", json={"text": "Likes long reviews."}, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert (r.json()["text"], r.json()["source"]) == ("Likes long reviews.", "user")
    r = client.put("/users/alice/profile", json={"text": "Now prefers short ones."}, headers=bearer(key))
    got = client.get("/users/alice/profile", headers=bearer(key)).json()
    assert got["text"] == "Now prefers short ones."
    assert got["updated_at"] >= r.json()["updated_at"][:19]
    pk = user_pk(client, "alice")
    assert pk is not None and sql_count(client, "profiles", pk) == 1


def test_delete_user_erases_rows_and_key(client: TestClient) -> None:
    key = create_user(client, "alice")
    other = create_user(client, "bob")
    append(client, "alice", key, [{"id": str(i), "output": f"pizza {i}"} for i in range(30)])
    append(client, "bob", other, [{"id": "b", "output": "bob's"}])
    client.put("/users/alice/profile", json={"text": "pizza fan"}, headers=bearer(key))
    # Warm Alice's BM25 cache so that a stale index would show up after re-creation.
    r = client.post("/users/alice/generate", json={"prompt": "pizza", "max_new_tokens": 1}, headers=bearer(key))
    assert r.status_code == 200 and r.json()["retrieved"], r.text
    pk = user_pk(client, "alice")
    assert pk is not None

    assert client.delete("/admin/users/alice", headers=admin_headers()).status_code == 204
    for table in ("history_items", "profiles", "api_keys", "users"):
        assert sql_count(client, table, pk) == 0, table
    r = client.get("/users/alice/history", headers=bearer(key))
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert client.get("/users/alice/history", headers=admin_headers()).status_code == 404
    assert client.delete("/admin/users/alice", headers=admin_headers()).status_code == 404
    # Bob is untouched.
    assert len(client.get("/users/bob/history", headers=bearer(other)).json()["items"]) == 1

    new_key = create_user(client, "alice")
    assert client.get("/users/alice/history", headers=bearer(key)).status_code == 401
    assert client.get("/users/alice/history", headers=bearer(new_key)).json() == {"items": [], "next_cursor": None}
    assert client.get("/users/alice/profile", headers=bearer(new_key)).status_code == 404
    r = client.post("/users/alice/generate", json={"prompt": "pizza", "max_new_tokens": 1}, headers=bearer(new_key))
    assert r.status_code == 200 and r.json()["retrieved"] == [], r.text
    # Old client ids are free again.
    assert append(client, "alice", new_key, [{"id": "0", "output": "fresh"}])["added"] == 1


def test_concurrent_appends_of_the_same_ids(client: TestClient) -> None:
    key = create_user(client, "alice")
    items = [{"id": f"k{i}", "output": f"text {i}"} for i in range(50)]
    barrier = threading.Barrier(8)
    results: list[Any] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=30)
            r = client.post("/users/alice/history", json={"items": items}, headers=bearer(key))
            results.append((r.status_code, r.json()))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert [s for s, _ in results] == [201] * 8, results
    assert sum(b["added"] for _, b in results) == 50
    assert all(b["added"] + b["duplicates"] == 50 for _, b in results)
    pk = user_pk(client, "alice")
    assert pk is not None and sql_count(client, "history_items", pk) == 50
    listed, _ = all_pages(client, "alice", key, limit=1000)
    assert sorted(i["id"] for i in listed) == sorted(i["id"] for i in items)


def test_append_is_committed_before_the_201_is_sent(client: TestClient) -> None:
    """Read-your-writes: once a client has the 201, another connection sees the rows (over real HTTP the
    client may otherwise query or generate before the commit, or get a 201 for a commit that then fails)."""
    key = create_user(client, "alice")
    body = json.dumps({"items": [{"id": "x", "output": "o"}]}).encode()
    seen: dict[str, int] = {}

    async def receive() -> dict[str, Any]:
        if "sent" not in seen:
            seen["sent"] = 1
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            seen["status"] = message["status"]
            with engine_of(client).connect() as conn:  # what any other reader sees at this instant
                seen["rows"] = int(conn.execute(text("SELECT count(*) FROM history_items")).scalar_one())

    async def run() -> None:
        headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
        headers.append((b"content-length", str(len(body)).encode()))
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/users/alice/history", "raw_path": b"/users/alice/history", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {},
        }  # fmt: skip
        await client.app(scope, receive, send)  # type: ignore[arg-type]

    client.portal.call(run)  # type: ignore[union-attr]
    assert seen["status"] == 201
    assert seen["rows"] == 1, "the 201 was sent before the rows were committed"


def test_history_quota_per_user(tmp_path: Path, tiny_model_path: Path) -> None:
    """Items and characters per user are bounded: an append that would pass either gets 409 quota_exceeded
    and stores nothing; duplicates cost nothing; another user has a quota of their own."""
    with running_app(tmp_path, tiny_model_path, history_max_items_per_user=5, history_max_chars_per_user=200) as client:
        key, other = create_user(client, "quota"), create_user(client, "quota2")

        def add(user: str, k: str, ids: list[str], size: int = 10) -> Any:
            items = [{"id": i, "output": "x" * size} for i in ids]
            return client.post(f"/users/{user}/history", json={"items": items}, headers=bearer(k))

        assert add("quota", key, ["a", "b", "c"]).status_code == 201
        r = add("quota", key, ["d", "e", "f"])
        assert r.status_code == 409 and r.json()["code"] == "quota_exceeded", r.text
        assert add("quota", key, ["a", "b", "c"]).json()["added"] == 0  # duplicates are free
        assert add("quota", key, ["d", "e"]).status_code == 201  # exactly 5
        assert add("quota", key, ["g"]).status_code == 409
        listed = client.get("/users/quota/history", headers=bearer(key)).json()["items"]
        assert [i["id"] for i in listed] == ["a", "b", "c", "d", "e"]
        r = add("quota2", other, ["big"], size=201)
        assert r.status_code == 409 and r.json()["details"]["max_chars"] == 200
        assert add("quota2", other, ["ok"], size=200).status_code == 201


def test_metadata_counts_against_the_character_quota(tmp_path: Path, tiny_model_path: Path) -> None:
    # Uncounted, 100k one-character items with 16 KiB of metadata each took ~2 GiB under a 64 Mi quota.
    with running_app(tmp_path, tiny_model_path, history_max_chars_per_user=1000) as client:
        key = create_user(client, "meta")
        heavy = {"items": [{"id": "m1", "output": "x", "metadata": {"blob": "y" * 2000}}]}
        r = client.post("/users/meta/history", json=heavy, headers=bearer(key))
        assert r.status_code == 409 and r.json()["code"] == "quota_exceeded", r.text
        light = {"items": [{"id": "m2", "output": "x", "metadata": {"é": "ü" * 10}}]}
        assert client.post("/users/meta/history", json=light, headers=bearer(key)).status_code == 201
        # characters, not bytes or ASCII escapes: 1 + len('{"é": "üüüüüüüüüü"}') = 1 + 19
        assert (
            client.post("/users/meta/history", json={"items": [{"output": "z" * 980}]}, headers=bearer(key)).status_code
            == 201
        )
        assert (
            client.post("/users/meta/history", json={"items": [{"output": "z"}]}, headers=bearer(key)).status_code
            == 409
        )


def test_a_page_stops_at_its_byte_budget_and_the_cursor_goes_on(client: TestClient) -> None:
    # 60 items of 20,000 emoji input and output (within every cap and the quota) made one ~9.6 MB page at
    # limit=1000 (1,000 such items: ~150 MiB of JSON in one response). A page now stops at 8 MiB of items.
    key = create_user(client, "emma")
    big = "😀" * 20_000
    headers = {**bearer(key), "Content-Type": "application/json"}
    for batch in range(4):
        items = [{"id": f"e{batch * 15 + i:02d}", "input": big, "output": big} for i in range(15)]
        body = json.dumps({"items": items}, ensure_ascii=False).encode()  # 2.4 MB: under the 4 MiB body cap
        assert client.post("/users/emma/history", content=body, headers=headers).status_code == 201
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 1000} | ({"cursor": cursor} if cursor else {})
        r = client.get("/users/emma/history", params=params, headers=bearer(key))
        assert r.status_code == 200 and len(r.content) <= service.PAGE_MAX_BYTES + 1024, len(r.content)
        seen += [i["id"] for i in r.json()["items"]]
        if (cursor := r.json()["next_cursor"]) is None:
            break
    assert seen == [f"e{i:02d}" for i in range(60)]


def test_an_item_larger_than_the_page_budget_is_a_page_of_its_own(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = create_user(client, "finn")
    append(client, "finn", key, [{"id": f"f{i}", "output": f"item {i}"} for i in range(5)])
    monkeypatch.setattr(service, "PAGE_MAX_BYTES", 1)
    items, pages = all_pages(client, "finn", key, 1000)
    assert [i["id"] for i in items] == [f"f{i}" for i in range(5)] and pages == 5
