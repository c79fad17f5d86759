"""Per-request deadline (504) and the docs switch."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.db.migrate import upgrade
from service.main import create_app
from tests.conftest import bearer, create_user, make_settings


def test_deadline_gives_504_and_frees_the_row(tmp_path: Path, tiny_model_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, str(tiny_model_path), request_timeout_s=0.3, max_new_tokens_cap=4096)
    with TestClient(create_app(settings)) as client:
        key = create_user(client, "slow")
        body = {"prompt": "go on forever", "max_new_tokens": 1900, "temperature": 0, "retrieval_k": 0}
        r = client.post("/users/slow/generate", json=body, headers=bearer(key))
        assert r.status_code == 504 and r.json()["code"] == "timeout"
        quick = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0}
        assert client.post("/users/slow/generate", json=quick, headers=bearer(key)).status_code == 200


def test_docs_can_be_disabled(tmp_path: Path, tiny_model_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    with TestClient(create_app(make_settings(tmp_path, url, str(tiny_model_path), docs_enabled=False))) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
        assert client.get("/healthz").status_code == 200
