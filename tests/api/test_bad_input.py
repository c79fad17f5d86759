"""Bad input never reaches a 500: every rejection is a 4xx JSON body with a stable `code` and a `message`."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import admin_headers, bearer, create_user, running_app

MAX_BODY = 256 * 1024
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)  # a Unicode category name, as hypothesis' characters() types it
CAP = 8  # max_new_tokens_cap of this module's app: valid fuzzed generates stay fast


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[TestClient]:
    with running_app(
        tmp_path_factory.mktemp("bad-input"),
        tiny_model_path,
        max_body_bytes=MAX_BODY,
        max_new_tokens_cap=CAP,
        default_max_new_tokens=4,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def key(app_client: TestClient) -> str:
    key = create_user(app_client, "u1")
    r = app_client.post(
        "/users/u1/history", json={"items": [{"id": "a", "output": "hello world"}]}, headers=bearer(key)
    )
    assert r.status_code == 201, r.text
    return key


def assert_error(r: Any, *statuses: int) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body: dict[str, Any] = r.json()
    assert isinstance(body.get("code"), str) and body["code"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    return body


def item(**fields: Any) -> dict[str, Any]:
    return {"output": "x", **fields}


BIG = "y" * 20_001
HISTORY_BODIES: list[tuple[str, Any]] = [
    ("items not a list", {"items": "x"}),
    ("items null", {"items": None}),
    ("no items key", {}),
    ("empty items", {"items": []}),
    ("1001 items", {"items": [item(id=str(i)) for i in range(1001)]}),
    ("item not an object", {"items": ["x"]}),
    ("missing output", {"items": [{"input": "q"}]}),
    ("empty output", {"items": [item(output="")]}),
    ("output int", {"items": [item(output=5)]}),
    ("output list", {"items": [item(output=["a"])]}),
    ("output over cap", {"items": [item(output=BIG)]}),
    ("input over cap", {"items": [item(input=BIG)]}),
    ("id empty", {"items": [item(id="")]}),
    ("id too long", {"items": [item(id="i" * 129)]}),
    ("id int", {"items": [item(id=7)]}),
    ("kind too long", {"items": [item(kind="k" * 65)]}),
    ("metadata list", {"items": [item(metadata=[1, 2])]}),
    ("metadata too big", {"items": [item(metadata={"k": "v" * 17_000})]}),
    ("timestamp garbage", {"items": [item(timestamp="yesterday")]}),
    ("timestamp year 99999", {"items": [item(timestamp="99999-01-01T00:00:00")]}),
    ("unknown item field", {"items": [item(score=1)]}),
    ("unknown body field", {"items": [item()], "user": "u2"}),
    ("NUL in output", {"items": [item(output="a\x00b")]}),
    ("NUL in client id", {"items": [item(id="\x00")]}),
]


@pytest.mark.parametrize(("label", "body"), HISTORY_BODIES, ids=[b[0] for b in HISTORY_BODIES])
def test_history_bad_bodies(app_client: TestClient, key: str, label: str, body: Any) -> None:
    r = app_client.post("/users/u1/history", json=body, headers=bearer(key))
    assert_error(r, 422)


GENERATE_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("no prompt", {}),
    ("empty prompt", {"prompt": ""}),
    ("prompt int", {"prompt": 3}),
    ("prompt over cap", {"prompt": "p" * 32_001}),
    ("max_new_tokens negative", {"max_new_tokens": -1}),
    ("max_new_tokens zero", {"max_new_tokens": 0}),
    ("max_new_tokens over the cap", {"max_new_tokens": CAP + 1}),
    ("max_new_tokens huge", {"max_new_tokens": 10**12}),
    ("max_new_tokens float", {"max_new_tokens": 1.5}),
    ("max_new_tokens string", {"max_new_tokens": "many"}),
    ("temperature negative", {"temperature": -0.01}),
    ("temperature huge", {"temperature": 1e9}),
    ("temperature string", {"temperature": "hot"}),
    ("top_p zero", {"top_p": 0}),
    ("top_p over one", {"top_p": 1.01}),
    ("top_p negative", {"top_p": -0.5}),
    ("retrieval_k 11", {"retrieval_k": 11}),
    ("retrieval_k negative", {"retrieval_k": -1}),
    ("seed negative", {"seed": -1}),
    ("seed over 2**63", {"seed": 2**64}),
    ("use_profile not bool", {"use_profile": "maybe"}),
    ("unknown field", {"adapter_path": "/etc/passwd"}),
]


@pytest.mark.parametrize(("label", "fields"), GENERATE_BODIES, ids=[b[0] for b in GENERATE_BODIES])
def test_generate_bad_bodies(app_client: TestClient, key: str, label: str, fields: dict[str, Any]) -> None:
    body = {"prompt": "hello", "max_new_tokens": 2, **fields}
    if label == "no prompt":
        body.pop("prompt")
    r = app_client.post("/users/u1/generate", json=body, headers=bearer(key))
    assert_error(r, 422)


def test_chat_messages_over_the_total_cap_are_422_before_tokenizing(app_client: TestClient, key: str) -> None:
    from service.openai_compat.schemas import MAX_CHAT_CHARS

    each = MAX_CHAT_CHARS // 3 + 1  # every message within its own limit, the sum one past the cap
    messages = [{"role": "user", "content": "x" * each} for _ in range(3)]
    r = app_client.post("/v1/chat/completions", json={"model": "personal", "messages": messages}, headers=bearer(key))
    body = assert_error(r, 422)
    assert "characters in all" in json.dumps(body)
    ok = [{"role": "user", "content": "hello"}] * 3
    r = app_client.post(
        "/v1/chat/completions", json={"model": "personal", "messages": ok, "max_tokens": 1}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text


def test_prompt_longer_than_the_context(app_client: TestClient, key: str) -> None:
    # 30,000 chars of distinct-ish words: far more tokens than the tiny model's 2,048 positions.
    prompt = " ".join(f"w{i}" for i in range(5000))[:30_000]
    r = app_client.post("/users/u1/generate", json={"prompt": prompt, "max_new_tokens": 2}, headers=bearer(key))
    body = assert_error(r, 413, 422)
    assert body["code"] == "prompt_too_long"


def test_a_raw_prompt_that_tokenizes_to_nothing_is_422_at_once(app_client: TestClient, key: str) -> None:
    """Found by schemathesis: a control character alone tokenizes to no token (a raw completion adds no
    template); the row could never be scheduled and waited for its deadline (504 after 120 s)."""
    started = time.monotonic()
    body = {"prompt": "\x1d", "max_tokens": 2, "model": "personal"}
    r = app_client.post("/v1/completions", json=body, headers=bearer(key))
    assert assert_error(r, 422)["code"] == "invalid_request"
    assert time.monotonic() - started < 10


RAW_BODIES: list[tuple[str, bytes, str | None]] = [
    ("not JSON", b"this is not json", "application/json"),
    ("truncated JSON", b'{"items": [', "application/json"),
    ("JSON array", b"[]", "application/json"),
    ("JSON string", b'"items"', "application/json"),
    ("JSON null", b"null", "application/json"),
    ("empty body", b"", "application/json"),
    ("NaN in metadata", b'{"items": [{"output": "x", "metadata": {"a": NaN}}]}', "application/json"),
    ("Infinity temperature", b'{"prompt": "x", "temperature": Infinity}', "application/json"),
    ("deeply nested", b"[" * 50_000 + b"]" * 50_000, "application/json"),
    ("invalid UTF-8", b'{"items": [{"output": "\xff\xfe"}]}', "application/json"),
    ("text/plain", b'{"items": [{"output": "x"}]}', "text/plain"),
    ("no content type", b'{"items": [{"output": "x"}]}', None),
]


@pytest.mark.parametrize(("label", "raw", "ctype"), RAW_BODIES, ids=[b[0] for b in RAW_BODIES])
@pytest.mark.parametrize("route", ["history", "generate"])
def test_raw_bodies(app_client: TestClient, key: str, route: str, label: str, raw: bytes, ctype: str | None) -> None:
    headers = bearer(key) if ctype is None else {**bearer(key), "Content-Type": ctype}
    r = app_client.post(f"/users/u1/{route}", content=raw, headers=headers)
    if route == "history" and label == "no content type" and r.status_code == 201:
        return  # FastAPI may accept JSON without a content type; that is fine
    assert_error(r)


def test_body_over_the_cap_is_413(app_client: TestClient, key: str) -> None:
    body = json.dumps({"items": [item(output="z" * 10_000) for _ in range(30)]}).encode()
    assert len(body) > MAX_BODY
    headers = {**bearer(key), "Content-Type": "application/json"}
    r = app_client.post("/users/u1/history", content=body, headers=headers)
    assert assert_error(r, 413)["code"] == "payload_too_large"


def test_chunked_body_over_the_cap_is_413(app_client: TestClient, key: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"items": [{"output": "'
        for _ in range(MAX_BODY // 8192 + 2):
            yield b"z" * 8192
        yield b'"}]}'

    headers = {**bearer(key), "Content-Type": "application/json"}
    r = app_client.post("/users/u1/history", content=chunks(), headers=headers)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert assert_error(r, 413)["code"] == "payload_too_large"


def test_chunked_body_under_the_cap_is_accepted(app_client: TestClient, key: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"items": [{"id": "chunked", '
        yield b'"output": "sent in pieces"}]}'

    headers = {**bearer(key), "Content-Type": "application/json"}
    r = app_client.post("/users/u1/history", content=chunks(), headers=headers)
    assert r.status_code == 201, r.text


BAD_USER_IDS = ["../x", "..%2Fx", "a/b", "a" * 65, "a" * 300, "-x", ".x", "_x", "é", "用户", "a b", "a%00", "%2e%2e"]


@pytest.mark.parametrize("user_id", BAD_USER_IDS)
@pytest.mark.parametrize(("method", "suffix"), [("GET", "history"), ("PUT", "profile"), ("POST", "generate")])
def test_bad_user_ids_in_paths(app_client: TestClient, key: str, user_id: str, method: str, suffix: str) -> None:
    body = {"text": "t"} if suffix == "profile" else {"prompt": "hi", "max_new_tokens": 1}
    for headers in (admin_headers(), bearer(key)):
        r = app_client.request(
            method, f"/users/{user_id}/{suffix}", json=None if method == "GET" else body, headers=headers
        )
        assert_error(r, 403, 404, 405, 422)
    r = app_client.delete(f"/admin/users/{user_id}", headers=admin_headers())
    assert_error(r, 404, 405, 422)


@pytest.mark.parametrize("user_id", ["../x", "a/b", "a" * 65, "-x", "é", "", " ", "a\x00", 5, None, ["a"]])
def test_bad_user_ids_on_create(app_client: TestClient, user_id: Any) -> None:
    r = app_client.post("/admin/users", json={"user_id": user_id}, headers=admin_headers())
    assert_error(r, 422)


def test_create_user_twice_is_409(app_client: TestClient) -> None:
    create_user(app_client, "twice")
    r = app_client.post("/admin/users", json={"user_id": "twice"}, headers=admin_headers())
    assert assert_error(r, 409)["code"] == "conflict"


def _cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=100000",
        "limit=abc",
        "limit=1.5",
        "cursor=!!!",
        "cursor=%00",
        f"cursor={_cursor('x:1')}",
        f"cursor={_cursor('h:abc')}",
        f"cursor={_cursor('h:-1')}",
        f"cursor={_cursor('h:' + '9' * 19)}",
        f"cursor={_cursor('h:' + str(2**31))}",  # past the 32-bit id column (PostgreSQL refused it: 500)
        f"cursor={_cursor('h:' + '9' * 18)}",
        "cursor=" + "A" * 65,
    ],
)
def test_history_bad_queries(app_client: TestClient, key: str, query: str) -> None:
    assert_error(app_client.get(f"/users/u1/history?{query}", headers=bearer(key)), 422)


def test_profile_bad_bodies(app_client: TestClient, key: str) -> None:
    body: object  # any JSON value
    for body in ({}, {"text": 5}, {"text": "t" * 20_001}, {"text": "t", "source": "generated"}, [], {"text": "\x00"}):
        assert_error(app_client.put("/users/u1/profile", json=body, headers=bearer(key)), 422)


def test_unknown_routes_and_methods_are_json(app_client: TestClient, key: str) -> None:
    assert assert_error(app_client.get("/nope"), 404)["code"] == "not_found"
    assert assert_error(app_client.delete("/users/u1/history", headers=bearer(key)), 405)["code"]


# --- a small fuzz: arbitrary JSON in every field ---------------------------------------------------
TEXT = st.text(alphabet=st.characters(exclude_categories=SURROGATES), max_size=40)
JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | TEXT
JSON_ANY = st.recursive(
    JSON_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8
)
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": TEXT | JSON_ANY,
            "max_new_tokens": st.integers(-3, CAP + 3) | JSON_ANY,
            "temperature": st.floats(-1, 6, allow_nan=False) | JSON_ANY,
            "top_p": st.floats(-0.5, 1.5, allow_nan=False) | JSON_ANY,
            "seed": st.integers(-5, 2**64) | JSON_ANY,
            "retrieval_k": st.integers(-2, 12) | JSON_ANY,
            "use_profile": st.booleans() | JSON_ANY,
            "extra": JSON_ANY,
        },
    )
    | JSON_ANY
)
def test_fuzz_generate(app_client: TestClient, key: str, body: Any) -> None:
    r = app_client.post("/users/u1/generate", json=body, headers=bearer(key))
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_error(r)


FUZZ_ITEM = st.fixed_dictionaries(
    {},
    optional={
        "id": TEXT | JSON_ANY,
        "input": TEXT | JSON_ANY,
        "output": TEXT | JSON_ANY,
        "kind": TEXT | JSON_ANY,
        "metadata": st.dictionaries(TEXT, JSON_ANY, max_size=3) | JSON_ANY,
        "timestamp": st.datetimes().map(lambda d: d.isoformat()) | TEXT | JSON_ANY,
    },
)


@FUZZ
@given(st.fixed_dictionaries({"items": st.lists(FUZZ_ITEM, max_size=4) | JSON_ANY}) | JSON_ANY)
def test_fuzz_history(app_client: TestClient, key: str, body: Any) -> None:
    r = app_client.post("/users/u1/history", json=body, headers=bearer(key))
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_error(r)
    else:
        assert r.status_code == 201 and r.json()["added"] + r.json()["duplicates"] == len(body["items"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(exclude_categories=SURROGATES), min_size=1, max_size=80))
def test_fuzz_user_id_path(app_client: TestClient, user_id: str) -> None:
    r = app_client.get(f"/users/{quote(user_id, safe='')}/history", headers=admin_headers())
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_error(r)


DB_SENSITIVE: dict[str, dict[str, Any]] = {
    "nul-output": {"items": [item(output="nul \x00 byte")]},
    "nul-input": {"items": [item(input="nul \x00 byte")]},
    "nul-kind": {"items": [item(kind="k\x00")]},
    "nul-metadata": {"items": [item(metadata={"k\x00": "v\x00"})]},
    "max-ts": {"items": [item(timestamp="9999-12-31T23:59:59+14:00")]},
    "min-ts": {"items": [item(timestamp="0001-01-01T00:00:00")]},
    "min-ts-east": {"items": [item(timestamp="0001-01-01T00:00:00+14:00")]},
    "bigint-meta": {"items": [item(metadata={"big": 2**70, "neg": -(2**70)})]},
}


def test_database_sensitive_values(client: TestClient) -> None:
    """Values one database accepts and the other does not: never a 500, on either (same answer on both)."""
    answers = {}
    for n, (label, body) in enumerate(DB_SENSITIVE.items()):
        key = create_user(client, f"db{n}")
        r = client.post(f"/users/db{n}/history", json=body, headers=bearer(key))
        assert r.status_code < 500, (label, r.text)
        if r.status_code >= 400:
            assert_error(r, 422)
        else:
            page = client.get(f"/users/db{n}/history", headers=bearer(key))
            assert page.status_code == 200, (label, page.text)
        answers[label] = r.status_code
    # The same on SQLite and PostgreSQL: NUL text and out-of-range instants are refused by the schema.
    assert answers == {
        "nul-output": 422,
        "nul-input": 422,
        "nul-kind": 422,
        "nul-metadata": 201,
        "max-ts": 201,
        "min-ts": 201,
        "min-ts-east": 422,
        "bigint-meta": 201,
    }


# Raw JSON: httpx cannot encode a lone surrogate itself, and "\ud800" is valid JSON that decodes to one.
LONE_SURROGATE_BODIES = {
    "output": '{"items": [{"output": "a\\ud800b"}]}',
    "input": '{"items": [{"output": "x", "input": "\\udfff"}]}',
    "id": '{"items": [{"output": "x", "id": "i\\ud800"}]}',
    "kind": '{"items": [{"output": "x", "kind": "\\ud800"}]}',
    "metadata-key": '{"items": [{"output": "x", "metadata": {"\\ud800": 1}}]}',
    "metadata-value": '{"items": [{"output": "x", "metadata": {"k": ["\\ud800"]}}]}',
}


@pytest.mark.parametrize("field", sorted(LONE_SURROGATE_BODIES))
def test_a_lone_surrogate_is_refused_not_a_500(app_client: TestClient, key: str, field: str) -> None:
    # It used to pass the schema and fail in sealing (UnicodeEncodeError: 500).
    headers = {**bearer(key), "content-type": "application/json"}
    r = app_client.post("/users/u1/history", content=LONE_SURROGATE_BODIES[field], headers=headers)
    assert "surrogate" in json.dumps(assert_error(r, 422))
    assert app_client.get("/users/u1/history", headers=bearer(key)).status_code == 200


def test_a_lone_surrogate_in_the_profile_is_refused(app_client: TestClient, key: str) -> None:
    headers = {**bearer(key), "content-type": "application/json"}
    assert_error(app_client.put("/users/u1/profile", content='{"text": "a\\ud800"}', headers=headers), 422)
    # A pair written as two escapes is one character: stored and read back.
    r = app_client.put("/users/u1/profile", content='{"text": "\\ud83d\\ude00"}', headers=headers)
    assert r.status_code == 200, r.text
    assert app_client.get("/users/u1/profile", headers=bearer(key)).json()["text"] == "\U0001f600"


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"k": value}


def test_metadata_nesting_is_capped_and_what_is_stored_can_be_listed(app_client: TestClient) -> None:
    # 260 levels used to be stored, then every page of the user's history was a 500 (pydantic's depth limit).
    key = create_user(app_client, "deep")
    too_deep = app_client.post("/users/deep/history", json={"items": [item(metadata=_nested(33))]}, headers=bearer(key))
    assert "deeper than 32" in json.dumps(assert_error(too_deep, 422))
    ok = app_client.post("/users/deep/history", json={"items": [item(metadata=_nested(32))]}, headers=bearer(key))
    assert ok.status_code == 201, ok.text
    page = app_client.get("/users/deep/history", headers=bearer(key))
    assert page.status_code == 200 and page.json()["items"][0]["metadata"] == _nested(32)


UNPARSABLE_JSON: list[tuple[str, bytes]] = [
    # Valid JSON that Python's parser refuses: an integer over its 4,300 digits, nesting past its recursion limit.
    ("5000-digit integer", b'{"items": [{"output": "x", "metadata": {"n": ' + b"7" * 5_000 + b"}}]}"),
    ("3000 nesting levels", b'{"items": [{"output": "x", "metadata": {"a": ' + b"[" * 3_000 + b"]" * 3_000 + b"}}]}"),
]
JSON_ROUTES = [
    ("POST", "/users/u1/history"),
    ("PUT", "/users/u1/profile"),
    ("POST", "/users/u1/generate"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/admin/users"),
]


@pytest.mark.parametrize(("label", "raw"), UNPARSABLE_JSON, ids=[b[0] for b in UNPARSABLE_JSON])
@pytest.mark.parametrize(("method", "path"), JSON_ROUTES, ids=[r[1] for r in JSON_ROUTES])
def test_json_the_parser_refuses_is_422_like_invalid_json(
    app_client: TestClient, key: str, label: str, raw: bytes, method: str, path: str
) -> None:
    # These were 400 "There was an error parsing the body" (FastAPI's answer to any parse error but
    # JSONDecodeError); bad input is 422 here, as invalid JSON already was (json_invalid).
    caller = admin_headers() if path.startswith("/admin/") else bearer(key)
    r = app_client.request(method, path, content=raw, headers={**caller, "Content-Type": "application/json"})
    body = assert_error(r, 422)
    assert body["code"] == "invalid_request" and body["details"][0]["type"] == "json_invalid", body
    if path.startswith("/v1/"):
        assert body["error"]["code"] == "invalid_request" and body["error"]["type"] == "invalid_request_error"
