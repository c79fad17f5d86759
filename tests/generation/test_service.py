"""generation/service: the preparation step behind the per-user gate, including callers that are cancelled."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from service.batching.tenant_gate import TenantGate
from service.errors import TooManyRequests
from service.generation import service
from service.generation.prepare import GenerationSpec, Personalization, PreparedRequest, Preparer
from service.generation.sampling import SamplingOptions
from service.tenancy import UserRef


@dataclass
class _Engine:
    on_reject: list[Any] = field(default_factory=list)


class _StallingPreparer:
    """Preparations that run in their worker thread until `release` is set (as one waiting on a cold index)."""

    def __init__(self, active: int, most: int) -> None:
        self.gate = TenantGate(active, most)
        self.engine = _Engine()
        self.release = threading.Event()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def prepare(self, spec: GenerationSpec) -> PreparedRequest:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            assert self.release.wait(30)
        finally:
            with self._lock:
                self.running -= 1
        return cast(PreparedRequest, spec)


def _spec(user: str) -> GenerationSpec:
    return GenerationSpec(UserRef(1, user, user), "hi", Personalization(), SamplingOptions())


def test_a_cancelled_preparation_keeps_its_place_until_its_thread_ends() -> None:
    """The client leaving cancelled the waiter at once while its thread (a worker thread and a pooled connection)
    ran on, and the next request of the same user took its place: connect-and-drop traffic ran 30 of one user's
    preparations at once against a cap of 4."""

    async def main() -> None:
        fake = _StallingPreparer(active=2, most=100)
        preparer = cast(Preparer, fake)
        first = [asyncio.ensure_future(service.prepare(preparer, _spec("u"))) for _ in range(2)]
        await asyncio.sleep(0.2)
        assert fake.running == 2
        for task in first:
            task.cancel()  # the clients left mid-preparation
        later = [asyncio.ensure_future(service.prepare(preparer, _spec("u"))) for _ in range(4)]
        await asyncio.sleep(0.3)
        assert fake.running == 2 and fake.gate.at_gate("u") == 6  # the cancelled two still hold their places
        fake.release.set()
        results = await asyncio.gather(*first, *later, return_exceptions=True)
        assert [isinstance(r, asyncio.CancelledError) for r in results] == [True, True, False, False, False, False]
        assert fake.most_running == 2 and fake.gate.at_gate("u") == 0

    asyncio.run(main())


def test_past_the_users_share_at_the_gate_is_429_and_counted() -> None:
    async def main() -> None:
        fake = _StallingPreparer(active=1, most=2)
        rejected: list[str] = []
        fake.engine.on_reject.append(rejected.append)
        preparer = cast(Preparer, fake)
        held = [asyncio.ensure_future(service.prepare(preparer, _spec("u"))) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(TooManyRequests):
            await service.prepare(preparer, _spec("u"))
        assert rejected == ["per_user"]
        other = asyncio.ensure_future(service.prepare(preparer, _spec("v")))  # another user is not refused
        fake.release.set()
        await asyncio.gather(*held, other)

    asyncio.run(main())
