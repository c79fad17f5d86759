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


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_blocked_client_keeps_only_max_failures_timestamps() -> None:
    """Every failure was kept, even from a client already blocked: 200,000 failures held ~6.4 MB for one
    address. Only the newest max_failures decide the block, so only they are kept."""
    clock = FakeClock()
    limiter = FailedAuthLimiter(max_failures=3, window_s=60, clock=clock)
    for _ in range(10_000):
        limiter.record_failure("203.0.113.7")
    assert sum(len(times) for times in limiter._failures.values()) == 3
    assert limiter.retry_after("203.0.113.7") is not None


def test_retry_after_is_when_the_block_lifts() -> None:
    """Failures at 0, 30 and 40 with 2 allowed per 60 s: the block lifts when the one at 30 leaves the
    window (after t=90), so at t=40 Retry-After is 51, not the 21 that the failure at 0 would say."""
    clock = FakeClock()
    limiter = FailedAuthLimiter(max_failures=2, window_s=60, clock=clock)
    for clock.now in (0.0, 30.0, 40.0):
        limiter.record_failure("a")
    assert limiter.retry_after("a") == 51
    clock.now = 61.0
    assert limiter.retry_after("a") == 30
    clock.now = 90.5
    assert limiter.retry_after("a") is None


def test_ipv6_clients_are_limited_per_64_prefix() -> None:
    """A client with a /64 has 2^64 addresses: one bucket per address gave it a fresh limit per guess.
    IPv4-mapped IPv6 is its IPv4 address; IPv4 is limited per address; an unparseable name is its own bucket."""
    limiter = FailedAuthLimiter(max_failures=2, window_s=60)
    limiter.record_failure("2001:db8:1:2::1")
    limiter.record_failure("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert limiter.retry_after("2001:db8:1:2::abcd") is not None
    assert limiter.retry_after("2001:db8:1:3::1") is None  # the next /64 is someone else
    limiter.record_failure("::ffff:198.51.100.9")
    limiter.record_failure("198.51.100.9")
    assert limiter.retry_after("::ffff:198.51.100.9") is not None
    assert limiter.retry_after("198.51.100.10") is None
    limiter.record_failure("testclient")
    limiter.record_failure("testclient")
    assert limiter.retry_after("testclient") is not None and limiter.retry_after("testclient2") is None


def test_forwarded_ipv6_clients_of_one_64_share_a_limit(tmp_path: Path, tiny_model_path: Path) -> None:
    with running_app(
        tmp_path, tiny_model_path, raise_server_exceptions=True, auth_max_failures=3, forwarded_allow_ips="testclient"
    ) as client:
        create_user(client, "ivy")
        for i in range(3):
            spoofed = {"X-Forwarded-For": f"2001:db8:7:7::{i + 1:x}", **bearer("oppu_wrong")}
            assert client.get("/users/ivy/history", headers=spoofed).status_code == 401
        fresh_address = {"X-Forwarded-For": "2001:db8:7:7:abcd::1", **bearer("oppu_wrong")}
        assert client.get("/users/ivy/history", headers=fresh_address).status_code == 429
