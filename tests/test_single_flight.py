"""SingleFlight: callers that arrive while a run is under way share it; a caller that leaves cancels nobody's
answer; an error reaches the callers of that run only."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.single_flight import SingleFlight


def test_callers_meanwhile_share_one_run_and_later_ones_start_another() -> None:
    runs: list[int] = []
    release = threading.Event()

    def compute() -> int:
        runs.append(len(runs))
        release.wait(5)
        return len(runs)

    async def scenario() -> None:
        flight: SingleFlight[int] = SingleFlight()
        callers = [asyncio.ensure_future(flight.run(compute)) for _ in range(20)]
        await asyncio.sleep(0.05)
        callers[0].cancel()  # its client left: the others still get the run's answer
        release.set()
        answers = await asyncio.gather(*callers[1:])
        assert answers == [1] * 19 and runs == [0]
        assert await flight.run(compute) == 2  # a caller after the run: a new one

    asyncio.run(scenario())


def test_an_error_reaches_that_runs_callers_and_the_next_run_is_fresh() -> None:
    calls: list[float] = []

    def failing() -> int:
        calls.append(time.monotonic())
        time.sleep(0.05)
        raise RuntimeError("database down")

    async def scenario() -> None:
        flight: SingleFlight[int] = SingleFlight()
        results = await asyncio.gather(*(flight.run(failing) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results) and len(calls) == 1
        assert await flight.run(lambda: 7) == 7

    asyncio.run(scenario())
    with pytest.raises(RuntimeError):
        asyncio.run(SingleFlight[int]().run(failing))
