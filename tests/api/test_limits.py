"""Per-request deadline (504) and the docs switch."""

from __future__ import annotations

from pathlib import Path

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
