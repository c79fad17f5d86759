from fastapi.testclient import TestClient

from tests.conftest import admin_headers, bearer, create_user


def test_walkthrough(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    key = create_user(client, "alice")
    r = client.post(
        "/users/alice/history", json={"items": [{"id": "a1", "output": "I love pizza"}]}, headers=bearer(key)
    )
    assert r.status_code == 201, r.text
    assert r.json() == {"added": 1, "duplicates": 0, "ids": ["a1"]}
    r = client.post(
        "/users/alice/generate", json={"prompt": "pizza?", "max_new_tokens": 5, "temperature": 0}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["retrieved"][0]["id"] == "a1"
    assert body["usage"]["completion_tokens"] <= 5
    assert client.delete("/admin/users/alice", headers=admin_headers()).status_code == 204
