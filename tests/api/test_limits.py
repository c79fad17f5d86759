"""Per-request deadline (504) and the docs switch."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import bearer, create_user, running_app


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
