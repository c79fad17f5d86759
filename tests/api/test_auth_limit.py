"""Failed-auth limit: after N bad keys from one address, bad keys get 429 with Retry-After, but a valid key
from the same address (others behind the same proxy) is still served; behind a trusted proxy the address is
the client's (X-Forwarded-For), never the proxy's."""

from __future__ import annotations

import time
from pathlib import Path

from service.ratelimit import FailedAuthLimiter
from tests.conftest import bearer, create_user, running_app


def test_bad_keys_are_limited_but_a_valid_key_never_is(tmp_path: Path, tiny_model_path: Path) -> None:
    with running_app(
        tmp_path, tiny_model_path, raise_server_exceptions=True, auth_max_failures=5, auth_failure_window_s=30
    ) as client:
        key = create_user(client, "gina")
        for _ in range(5):
            assert client.get("/users/gina/history", headers=bearer("wrong")).status_code == 401
        r = client.get("/users/gina/history", headers=bearer("wrong"))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["code"] == "too_many_requests"
        assert client.get("/users/gina/history", headers=bearer(key)).status_code == 200  # same address


def test_behind_a_trusted_proxy_failures_count_per_forwarded_client(tmp_path: Path, tiny_model_path: Path) -> None:
    """The H2 report: every client behind nginx shares its address. With the proxy trusted, the attacker's
    20 bad keys lock only the attacker's forwarded address."""
    with running_app(
        tmp_path,
        tiny_model_path,
        raise_server_exceptions=True,
        auth_max_failures=20,
        forwarded_allow_ips="testclient",  # the TestClient's peer address plays the proxy
    ) as client:
        key = create_user(client, "hank")
        attacker = {"X-Forwarded-For": "203.0.113.7"}
        for _ in range(25):
            client.get("/users/hank/history", headers={**bearer("oppu_wrong"), **attacker})
        assert client.get("/users/hank/history", headers={**bearer("oppu_wrong"), **attacker}).status_code == 429
        victim = {"X-Forwarded-For": "198.51.100.9"}
        assert client.get("/users/hank/history", headers={**bearer("oppu_wrong"), **victim}).status_code == 401
        assert client.get("/users/hank/history", headers={**bearer(key), **victim}).status_code == 200
        assert client.get("/users/hank/history", headers={**bearer(key), **attacker}).status_code == 200


def test_limiter_window_and_bound() -> None:
    limiter = FailedAuthLimiter(max_failures=2, window_s=0.05, max_clients=3)
    limiter.record_failure("a")
    assert limiter.retry_after("a") is None
    limiter.record_failure("a")
    assert limiter.retry_after("a") is not None
    assert limiter.retry_after("b") is None
    time.sleep(0.06)
    assert limiter.retry_after("a") is None  # the window slid past
    for client in "cdefg":
        limiter.record_failure(client)
    assert len(limiter._failures) <= 3
