"""Failed-auth rate limit: after N bad keys from one address, 429 with Retry-After, even for a good key."""

from __future__ import annotations

from pathlib import Path

from service.ratelimit import FailedAuthLimiter
from tests.conftest import bearer, create_user, running_app


def test_failed_auth_is_rate_limited(tmp_path: Path, tiny_model_path: Path) -> None:
    with running_app(
        tmp_path, tiny_model_path, raise_server_exceptions=True, auth_max_failures=5, auth_failure_window_s=30
    ) as client:
        key = create_user(client, "gina")
        for _ in range(5):
            assert client.get("/users/gina/history", headers=bearer("wrong")).status_code == 401
        r = client.get("/users/gina/history", headers=bearer(key))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["code"] == "too_many_requests"


def test_limiter_window_and_bound() -> None:
    limiter = FailedAuthLimiter(max_failures=2, window_s=0.05, max_clients=3)
    limiter.record_failure("a")
    assert limiter.retry_after("a") is None
    limiter.record_failure("a")
    assert limiter.retry_after("a") is not None
    assert limiter.retry_after("b") is None
    import time

    time.sleep(0.06)
    assert limiter.retry_after("a") is None  # the window slid past
    for client in "cdefg":
        limiter.record_failure(client)
    assert len(limiter._failures) <= 3
