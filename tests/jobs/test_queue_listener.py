"""service/jobs/queue.py's pub/sub listener loop on a fake Redis: a listener that fails on one notice (e.g. a
database blip in the shared-adapter notice's SQL read) was taken for a lost Redis: the subscription, and
the notices buffered on it, were dropped and re-made a second later."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from service.jobs.queue import ADAPTER_CHANNEL, REVOKED_CHANNEL, Listeners, RedisJobQueue


class FakePubSub:
    def __init__(self, messages: list[dict[str, Any]], stop: threading.Event) -> None:
        self.messages, self.stop = messages, stop
        self.closed = False

    def subscribe(self, *channels: str) -> None:
        pass

    def get_message(self, timeout: float) -> dict[str, Any] | None:
        if self.messages:
            return self.messages.pop(0)
        self.stop.set()  # all delivered (a fresh subscription gets nothing: what was buffered is gone)
        return None

    def close(self) -> None:
        self.closed = True


class FakeRedis:
    def __init__(self, buffered: list[dict[str, Any]], stop: threading.Event) -> None:
        self.buffered, self.stop = buffered, stop
        self.subscriptions: list[FakePubSub] = []

    def pubsub(self, ignore_subscribe_messages: bool) -> FakePubSub:
        messages, self.buffered = self.buffered, []
        self.subscriptions.append(FakePubSub(messages, self.stop))
        return self.subscriptions[-1]


def test_a_failing_listener_keeps_the_subscription_and_the_notices_after_it(caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    notices = [
        {"channel": ADAPTER_CHANNEL.encode(), "data": b"bad 3"},
        {"channel": ADAPTER_CHANNEL.encode(), "data": b"ann 4"},
        {"channel": REVOKED_CHANNEL.encode(), "data": b"h1,h2"},
    ]
    redis = FakeRedis(notices, stop)
    adapters: list[tuple[str, int | None]] = []
    revoked: list[list[str]] = []

    def on_adapter(owner: str, version: int | None) -> None:
        if owner == "bad":
            raise RuntimeError("database unreachable")
        adapters.append((owner, version))

    queue = RedisJobQueue("redis://127.0.0.1:1/0", job_timeout_s=60)
    queue.redis = redis  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="service.jobs.queue"):
        queue._listen(Listeners(on_adapter, revoked.append), stop)
    assert adapters == [("ann", 4)] and revoked == [["h1", "h2"]]
    assert len(redis.subscriptions) == 1 and redis.subscriptions[0].closed
    assert "a notice listener failed" in caplog.text and "database unreachable" in caplog.text
