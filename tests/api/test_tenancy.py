"""Tenancy matrix: every /users/{user_id}/... route x every kind of caller; no cross-user 2xx, no leak.

The route table below is the contract: a new route under /users/{user_id} (or /admin) fails
`test_every_route_is_in_the_matrix` until it is added to USER_ROUTES / ADMIN_ROUTES, or listed with a
reason in NOT_IN_MATRIX.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import admin_headers, app_state, bearer, create_user
from tests.factories import PromptRecorder

CANARY = "zanzibarcanary"
# Bob's secret items: every word of Alice's generate prompt below appears in them, so a BM25 index that
# mixed users would rank these first for her. The canary itself is not in the query, only in Bob's data.
BOB_ITEMS = [{"id": f"bob-{i}", "input": "quokka pineapple", "output": f"{CANARY} secret number {i}"} for i in range(5)]
ALICE_ITEMS = [
    {"id": "alice-1", "output": "I love hiking in the mountains"},
    {"id": "alice-2", "input": "favourite food?", "output": "spicy ramen, always"},
]
LEAK_QUERY = "quokka pineapple secret number"


AUTHORISED_2XX = frozenset(range(200, 300))


@dataclass(frozen=True)
class RouteCase:
    method: str
    path: str  # the route's template, as FastAPI reports it
    json: dict[str, Any] | None = None
    content: bytes | None = None
    # What an authorised caller (own key, admin) may get: 2xx unless the route can legitimately answer
    # "nothing here" (404) or reject a plausible-but-invalid upload; never 401/403/5xx.
    ok: frozenset[int] = AUTHORISED_2XX
    # Erases or re-keys its user: run against a fresh throwaway user per call.
    destructive: bool = False

    def url(self, user_id: str) -> str:
        return self.path.replace("{user_id}", user_id).replace("{job_id}", "no-such-job")


EMPTY_ZIP = b"PK\x05\x06" + b"\x00" * 18  # a valid, empty zip archive: not a valid adapter
NO_ADAPTER = frozenset({200, 404})

# One row per route under /users/{user_id}. Bodies are valid, so only auth decides the outcome.
USER_ROUTES: list[RouteCase] = [
    RouteCase("POST", "/users/{user_id}/history", {"items": [{"output": "an ordinary item about hiking boots"}]}),
    RouteCase("GET", "/users/{user_id}/history"),
    RouteCase("PUT", "/users/{user_id}/profile", {"text": "likes quokka facts"}),
    RouteCase("GET", "/users/{user_id}/profile"),
    RouteCase(
        "POST",
        "/users/{user_id}/generate",
        {"prompt": LEAK_QUERY, "max_new_tokens": 3, "temperature": 0, "retrieval_k": 10, "use_profile": True},
    ),
    RouteCase(
        "POST",
        "/users/{user_id}/score",
        {"prompt": LEAK_QUERY, "candidates": ["yes", "no"], "retrieval_k": 10, "use_profile": True},
    ),
    # Adapters: the users in this test have none, so 404 also means "authorised".
    RouteCase("GET", "/users/{user_id}/adapter", ok=NO_ADAPTER),
    RouteCase("GET", "/users/{user_id}/adapter/versions", ok=NO_ADAPTER),
    RouteCase("GET", "/users/{user_id}/adapter/download", ok=NO_ADAPTER),
    RouteCase("PUT", "/users/{user_id}/adapter", content=EMPTY_ZIP, ok=frozenset({201, 400, 413, 415, 422})),
    RouteCase("DELETE", "/users/{user_id}/adapter", ok=frozenset({204, 404})),
    # Data rights: the export is a zip, searched member by member for the canary.
    RouteCase("GET", "/users/{user_id}/export"),
    RouteCase("POST", "/users/{user_id}/keys/rotate", destructive=True),
    RouteCase("POST", "/users/{user_id}/keys/rotate-data-key"),
    RouteCase("GET", "/users/{user_id}/jobs/{job_id}", ok=frozenset({404})),  # the url's job id exists nowhere
    RouteCase("DELETE", "/users/{user_id}", destructive=True),
]
# Admin-only routes: user keys get 403 (also on their own user), no/garbage keys 401.
ADMIN_ROUTES: list[RouteCase] = [
    RouteCase("POST", "/admin/users", {"user_id": "mallory"}),
    RouteCase("DELETE", "/admin/users/{user_id}"),
    RouteCase("POST", "/admin/users/{user_id}/adapter/rollback", {"version": 1}),
    RouteCase("POST", "/admin/users/{user_id}/keys/revoke"),
    RouteCase("POST", "/admin/users/{user_id}/retrain"),
    RouteCase("POST", "/admin/users/{user_id}/keys/rotate-data-key"),
    RouteCase("POST", "/admin/users/{user_id}/profile/generate"),
    RouteCase("POST", "/admin/shared-adapter/retrain"),
    RouteCase("GET", "/admin/shared-adapter"),
    RouteCase("GET", "/admin/jobs/{job_id}"),
    RouteCase("POST", "/admin/jobs/{job_id}/cancel"),
    RouteCase("POST", "/admin/adapters/retrain-stale"),
]
# (method, path) -> why it is not in the matrix. Read by the coverage test: never skip silently.
NOT_IN_MATRIX: dict[tuple[str, str], str] = {}

CALLERS = ("own", "other", "admin", "none", "garbage", "malformed")
MALFORMED_HEADERS = [
    "Bearer",
    "Bearer   ",
    "Basic dXNlcjpwYXNz",
    "Token abc",
    "Bearer " + "k" * 300,
    "bearer",
]


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every HTTP route, including routes inside included routers."""
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[set[str], str]]:
        for route in routes:
            if hasattr(route, "effective_route_contexts"):  # FastAPI's included-router wrapper
                for ctx in route.effective_route_contexts():
                    yield set(getattr(ctx.original_route, "methods", None) or ()), ctx.path
            elif hasattr(route, "routes") and hasattr(route, "path"):  # a mount or a plain sub-router
                yield from walk(list(route.routes), prefix + route.path)
            elif hasattr(route, "path"):
                yield set(getattr(route, "methods", None) or ()), prefix + route.path

    for methods, path in walk(list(app.routes)):
        for method in methods - {"HEAD", "OPTIONS"}:
            found.add((method, path))
    # The OpenAPI schema is a second, public view of the same routes.
    for path, ops in app.openapi().get("paths", {}).items():
        found.update((m.upper(), path) for m in ops if m.upper() not in {"HEAD", "OPTIONS", "PARAMETERS"})
    return found


def caller_headers(kind: str, keys: dict[str, str], owner: str, malformed: str = "Bearer") -> dict[str, str]:
    other = "bob" if owner == "alice" else "alice"
    if kind == "own":
        return bearer(keys[owner])
    if kind == "other":
        return bearer(keys[other])
    if kind == "admin":
        return admin_headers()
    if kind == "none":
        return {}
    if kind == "garbage":
        return bearer("oppu_" + "not-a-real-key-" * 3)
    return {"Authorization": malformed}


def expected_statuses(kind: str, case: RouteCase) -> frozenset[int]:
    if kind in ("own", "admin"):
        return case.ok
    return frozenset({403} if kind == "other" else {401})


def call(client: TestClient, case: RouteCase, user_id: str, headers: dict[str, str]) -> Any:
    if case.content is not None:
        headers = {**headers, "Content-Type": "application/zip"}
        return client.request(case.method, case.url(user_id), content=case.content, headers=headers)
    return client.request(case.method, case.url(user_id), json=case.json, headers=headers)


def setup_users(client: TestClient) -> dict[str, str]:
    keys = {"alice": create_user(client, "alice"), "bob": create_user(client, "bob")}
    for user, items in (("alice", ALICE_ITEMS), ("bob", BOB_ITEMS)):
        r = client.post(f"/users/{user}/history", json={"items": items}, headers=admin_headers())
        assert r.status_code == 201, r.text
    seed_bob_profile(client)
    r = client.put("/users/alice/profile", json={"text": "alice likes hiking"}, headers=admin_headers())
    assert r.status_code == 200, r.text
    return keys


def seed_bob_profile(client: TestClient) -> None:
    r = client.put("/users/bob/profile", json={"text": f"{CANARY} profile of bob"}, headers=admin_headers())
    assert r.status_code == 200, r.text


def response_bytes(r: Any) -> bytes:
    """The body, with zip archives (exports, adapter downloads) expanded so their contents are searched."""
    if r.content[:2] != b"PK":
        return bytes(r.content)
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        return b"\n".join(zf.read(name) for name in zf.namelist())


def test_every_route_is_in_the_matrix(sqlite_client: TestClient) -> None:
    routes = app_routes(sqlite_client.app)  # type: ignore[arg-type]
    covered = {(c.method, c.path) for c in USER_ROUTES + ADMIN_ROUTES} | set(NOT_IN_MATRIX)
    user_scoped = {r for r in routes if "{user_id}" in r[1] or r[1].startswith(("/users", "/admin"))}
    missing = sorted(user_scoped - covered)
    assert not missing, f"routes missing from the tenancy matrix (add them to USER_ROUTES/ADMIN_ROUTES): {missing}"
    stale = sorted({(c.method, c.path) for c in USER_ROUTES + ADMIN_ROUTES} - routes)
    assert not stale, f"matrix rows for routes that no longer exist: {stale}"


def check_response(case: RouteCase, kind: str, r: Any, label: str) -> list[str]:
    failures = []
    want = expected_statuses(kind, case)
    if r.status_code not in want:
        failures.append(f"{label}, want one of {sorted(want)}: {r.text[:200]}")
    if r.status_code >= 400:
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if not {"code", "message"} <= set(body):
            failures.append(f"{label}: error body without code/message: {r.text[:200]}")
    if r.status_code == 401 and "bearer" not in r.headers.get("www-authenticate", "").lower():
        failures.append(f"{label}: 401 without WWW-Authenticate: Bearer")
    return failures


def drain_jobs(client: TestClient) -> None:
    """Wait for the jobs the matrix started (a data-key rotation returns 202 and runs on): none may outlive the
    app and its database (a job left running holds a connection past the test)."""
    queue = app_state(client).queue
    deadline = time.monotonic() + 60
    while getattr(queue, "depth", lambda: 0)() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)


def test_tenancy_matrix(client: TestClient) -> None:
    """Every user route x every caller, on both databases; nothing of Bob's ever reaches Alice."""
    app_state(client).jobs.key_settle_s = 0.0  # the rotations it starts: no settle wait (one process)
    keys = setup_users(client)
    failures: list[str] = []
    with PromptRecorder(client) as recorder:
        for owner in ("alice", "bob"):
            for case in (c for c in USER_ROUTES if not c.destructive):
                for kind in CALLERS:
                    for malformed in MALFORMED_HEADERS if kind == "malformed" else ["-"]:
                        n_prompts = len(recorder.prompts)
                        r = call(client, case, owner, caller_headers(kind, keys, owner, malformed))
                        label = f"{case.method} {case.url(owner)} as {kind} ({malformed[:20]!r}): {r.status_code}"
                        failures += check_response(case, kind, r, label)
                        # Bob's data may only reach Bob himself or the admin, on Bob's routes.
                        if owner == "bob" and kind in ("own", "admin"):
                            if case.method != "GET" and r.status_code < 300:
                                seed_bob_profile(client)  # keep Bob's canary profile in place
                            continue
                        if CANARY.encode() in response_bytes(r):
                            failures.append(f"{label}: Bob's canary leaked: {r.text[:300]}")
                        for prompt in recorder.prompts[n_prompts:]:
                            if CANARY in prompt:
                                failures.append(f"{label}: Bob's canary in the model prompt: {prompt!r}")
                        if case.path.endswith("/generate") and r.status_code == 200:
                            ids = {h["id"] for h in r.json()["retrieved"]}
                            if not ids <= set(_history_ids(client, owner)):
                                failures.append(f"{label}: retrieved someone else's items: {ids}")
    drain_jobs(client)
    assert not failures, "\n".join(failures)


def test_destructive_routes_matrix(client: TestClient) -> None:
    """Erase and key rotation, each call on a fresh user: only the user themself or the admin may."""
    keys = setup_users(client)
    failures: list[str] = []
    n = 0
    for case in (c for c in USER_ROUTES if c.destructive):
        for kind in CALLERS:
            n += 1
            victim = f"victim{n}"
            created = client.post("/admin/users", json={"user_id": victim}, headers=admin_headers()).json()
            victim_key = created["api_key"]
            headers = caller_headers(kind, {**keys, "alice": victim_key}, "alice")  # other = Bob's key
            this = case  # the owner's rotation re-authenticates with the code (another's key fails with it too)
            if case.path.endswith("/keys/rotate"):
                this = replace(case, json={"recovery_code": created["recovery_code"]})
            r = call(client, this, victim, headers)
            label = f"{case.method} {case.url(victim)} as {kind}: {r.status_code}"
            failures += check_response(case, kind, r, label)
            still_works = client.get(f"/users/{victim}/history", headers=bearer(victim_key)).status_code == 200
            if still_works != (r.status_code >= 400):
                failures.append(f"{label}: the victim's old key works={still_works} after that answer")
    assert not failures, "\n".join(failures)


def _history_ids(client: TestClient, user_id: str) -> list[str]:
    r = client.get(f"/users/{user_id}/history?limit=1000", headers=admin_headers())
    return [i["id"] for i in r.json()["items"]]


def test_alice_generate_never_sees_bob(sqlite_client: TestClient) -> None:
    """A query made of Bob's words: Alice gets only her own items (or none), and Bob gets his."""
    keys = {"alice": create_user(sqlite_client, "alice2"), "bob": create_user(sqlite_client, "bob2")}
    sqlite_client.post("/users/alice2/history", json={"items": ALICE_ITEMS}, headers=bearer(keys["alice"]))
    sqlite_client.post("/users/bob2/history", json={"items": BOB_ITEMS}, headers=bearer(keys["bob"]))
    body = {"prompt": LEAK_QUERY, "max_new_tokens": 2, "temperature": 0, "retrieval_k": 10}
    with PromptRecorder(sqlite_client) as recorder:
        r = sqlite_client.post("/users/alice2/generate", json=body, headers=bearer(keys["alice"]))
        assert r.status_code == 200, r.text
        assert r.json()["retrieved"] == []  # none of Alice's items share a term with the query
        assert all(CANARY not in p for p in recorder.prompts)
        # The same query on Bob's own route does retrieve his items: the test would catch a leak.
        r = sqlite_client.post("/users/bob2/generate", json=body, headers=bearer(keys["bob"]))
        assert r.status_code == 200, r.text
        assert {h["id"] for h in r.json()["retrieved"]} == {i["id"] for i in BOB_ITEMS}
        assert CANARY in recorder.prompts[-1]


def test_user_key_on_unknown_user_is_403_not_404(sqlite_client: TestClient) -> None:
    key = create_user(sqlite_client, "carol")
    for case in USER_ROUTES:
        r = call(sqlite_client, case, "nobody-here", bearer(key))
        assert r.status_code == 403, (case, r.text)  # existence of other users is not revealed
        r = call(sqlite_client, case, "nobody-here", admin_headers())
        assert r.status_code == 404, (case, r.text)
        assert r.json()["code"] == "not_found"


def test_admin_routes_refuse_user_keys(sqlite_client: TestClient) -> None:
    key = create_user(sqlite_client, "dave")
    create_user(sqlite_client, "erin")
    for case in ADMIN_ROUTES:
        for target in ("dave", "erin"):
            for headers, want in (
                (bearer(key), 403),
                ({}, 401),
                (bearer("oppu_garbage"), 401),
                ({"Authorization": "Basic abc"}, 401),
            ):
                r = call(sqlite_client, case, target, headers)
                assert r.status_code == want, (case, target, headers, r.text)
                assert {"code", "message"} <= set(r.json())
    # Nothing was created or deleted by those calls.
    assert sqlite_client.get("/users/dave/history", headers=bearer(key)).status_code == 200
    assert sqlite_client.get("/users/erin/history", headers=admin_headers()).status_code == 200
    r = sqlite_client.post("/admin/users", json={"user_id": "mallory"}, headers=admin_headers())
    assert r.status_code == 201, r.text


def test_keys_are_not_interchangeable_after_delete(sqlite_client: TestClient) -> None:
    old = create_user(sqlite_client, "frank")
    assert sqlite_client.delete("/admin/users/frank", headers=admin_headers()).status_code == 204
    new = create_user(sqlite_client, "frank")
    assert new != old
    assert sqlite_client.get("/users/frank/history", headers=bearer(old)).status_code == 401
    assert sqlite_client.get("/users/frank/history", headers=bearer(new)).status_code == 200


def test_openai_routes_stay_in_the_callers_history(sqlite_client: TestClient) -> None:
    """/v1 routes name no user in the path: the key decides, and `model` cannot point at someone else."""
    alice, bob = create_user(sqlite_client, "oa-alice"), create_user(sqlite_client, "oa-bob")
    sqlite_client.post("/users/oa-alice/history", json={"items": ALICE_ITEMS}, headers=bearer(alice))
    sqlite_client.post("/users/oa-bob/history", json={"items": BOB_ITEMS}, headers=bearer(bob))
    base = sqlite_client.get("/v1/models", headers=bearer(alice)).json()["data"][-1]["id"]
    chat = {"messages": [{"role": "user", "content": LEAK_QUERY}], "max_tokens": 2, "temperature": 0, "retrieval_k": 10}
    with PromptRecorder(sqlite_client) as recorder:
        for model in ("personal", base, "user:oa-bob", "oa-bob", "personal:oa-bob"):
            for route, body in (
                ("/v1/chat/completions", {**chat, "model": model}),
                ("/v1/completions", {"model": model, "prompt": LEAK_QUERY, "max_tokens": 2, "retrieval_k": 10}),
            ):
                before = len(recorder.prompts)
                r = sqlite_client.post(route, json=body, headers=bearer(alice))
                assert r.status_code < 500, r.text
                if model not in ("personal", base):
                    assert r.status_code in (403, 404), (route, model, r.text)
                assert CANARY not in r.text, (route, model, r.text)
                assert all(CANARY not in p for p in recorder.prompts[before:]), (route, model)
        # Positive control: the admin naming Bob does get Bob's history into the prompt.
        r = sqlite_client.post("/v1/chat/completions", json={**chat, "model": "user:oa-bob"}, headers=admin_headers())
        assert r.status_code == 200, r.text
        assert CANARY in recorder.prompts[-1]
