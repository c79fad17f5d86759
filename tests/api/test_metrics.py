"""GET /metrics exposes the documented series with real values after traffic."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import bearer, create_user, running_app


def test_metrics_after_traffic(sqlite_client: TestClient) -> None:
    key = create_user(sqlite_client, "metrics-user")
    body = {"prompt": "hello", "max_new_tokens": 3, "temperature": 0}
    assert sqlite_client.post("/users/metrics-user/generate", json=body, headers=bearer(key)).status_code == 200
    assert sqlite_client.get("/users/metrics-user/history", headers=bearer("nope")).status_code == 401
    text = sqlite_client.get("/metrics").text
    assert 'oppu_http_requests_total{method="POST",route="/users/{user_id}/generate",status="200"}' in text
    assert 'route="/users/{user_id}/history",status="401"' in text
    assert "metrics-user" not in text  # user ids never become label values
    assert "oppu_batch_size_count" in text and "oppu_generated_tokens_total" in text
    tokens = [line for line in text.splitlines() if line.startswith("oppu_generated_tokens_total")]
    assert float(tokens[0].split()[-1]) >= 1
    for name in (
        "oppu_adapter_slots_in_use",
        "oppu_job_queue_depth",
        "oppu_stale_adapters",
        "oppu_jobs",
        "oppu_adapter_cache_events",
        "oppu_adapter_swap_seconds",
        "oppu_generate_queue_depth",
    ):
        assert name in text, name


def test_invented_methods_do_not_grow_the_http_series(sqlite_client: TestClient) -> None:
    """2,000 requests with invented HTTP methods: the HTTP family stays under 200 series (methods -> other)."""
    for i in range(2000):
        sqlite_client.request(f"X{i:04d}", "/healthz")
    text = sqlite_client.get("/metrics").text
    series = [
        line for line in text.splitlines() if line.startswith(("oppu_http_requests_total", "oppu_http_request_seconds"))
    ]
    assert len(series) < 200, len(series)
    assert 'method="other"' in text and "X0001" not in text


def test_metrics_token(tmp_path: Path, tiny_model_path: Path) -> None:
    with running_app(tmp_path, tiny_model_path, metrics_token="s3cret-metrics") as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer("wrong")).status_code == 401
        r = client.get("/metrics", headers=bearer("s3cret-metrics"))
        assert r.status_code == 200 and "oppu_http_requests_total" in r.text
