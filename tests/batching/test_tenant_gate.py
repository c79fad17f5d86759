"""tenant_gate: a tenant's preparations at once, its requests at the gate, and nothing kept after them."""

from __future__ import annotations

import asyncio

import pytest

from service.batching.fair_queue import TenantQueueFull
from service.batching.tenant_gate import TenantGate


async def _hold(gate: TenantGate, tenant: str, inside: list[str], release: asyncio.Event) -> None:
    async with gate.admit(tenant):
        inside.append(tenant)
        try:
            await release.wait()
        finally:
            inside.remove(tenant)


def test_a_tenant_runs_at_most_active_at_once_and_others_are_not_held_up() -> None:
    async def main() -> None:
        gate = TenantGate(active=2, most=5)
        release = asyncio.Event()
        inside: list[str] = []
        burst = [asyncio.create_task(_hold(gate, "a", inside, release)) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert inside == ["a", "a"] and gate.at_gate("a") == 5
        other = asyncio.create_task(_hold(gate, "b", inside, asyncio.Event()))
        await asyncio.sleep(0.01)
        assert inside.count("b") == 1  # b's first request does not wait behind a's burst
        other.cancel()
        release.set()
        await asyncio.gather(*burst, other, return_exceptions=True)
        assert inside == [] and gate.at_gate("a") == 0 and gate.at_gate("b") == 0

    asyncio.run(main())


def test_past_most_at_the_gate_the_tenant_is_refused_at_once() -> None:
    async def main() -> None:
        gate = TenantGate(active=1, most=3)
        release = asyncio.Event()
        inside: list[str] = []
        held = [asyncio.create_task(_hold(gate, "a", inside, release)) for _ in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(TenantQueueFull):
            async with gate.admit("a"):
                raise AssertionError("admitted past the tenant's share")
        async with gate.admit("b"):  # another tenant still gets in
            pass
        release.set()
        await asyncio.gather(*held)
        async with gate.admit("a"):  # and the tenant again, once its requests are done
            pass

    asyncio.run(main())


def test_a_request_cancelled_while_waiting_gives_its_place_back() -> None:
    async def main() -> None:
        gate = TenantGate(active=1, most=2)
        release = asyncio.Event()
        inside: list[str] = []
        first = asyncio.create_task(_hold(gate, "a", inside, release))
        waiting = asyncio.create_task(_hold(gate, "a", inside, release))
        await asyncio.sleep(0.01)
        assert gate.at_gate("a") == 2 and inside == ["a"]
        waiting.cancel()  # the client left while its request waited its turn
        await asyncio.sleep(0.01)
        assert gate.at_gate("a") == 1
        release.set()
        await first
        assert gate.at_gate("a") == 0 and gate._tenants == {}

    asyncio.run(main())


def test_an_error_inside_frees_the_turn() -> None:
    async def main() -> None:
        gate = TenantGate(active=1, most=4)
        with pytest.raises(ValueError):
            async with gate.admit("a"):
                raise ValueError("the preparation failed")
        await asyncio.wait_for(_hold(gate, "a", [], _set(asyncio.Event())), 1)

    asyncio.run(main())


def test_most_zero_refuses_everyone_and_active_must_be_positive() -> None:
    async def main() -> None:
        with pytest.raises(TenantQueueFull):
            async with TenantGate(active=1, most=0).admit("a"):
                pass

    asyncio.run(main())
    with pytest.raises(ValueError):
        TenantGate(active=0, most=4)


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event
