"""A non-streaming client that goes away: its generation is cancelled, so the scheduler frees the row."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.api.generate import until_disconnect
from service.batching.scheduler import GenerationJob
from service.inference.engine import SamplingParams


class GoneRequest:
    async def is_disconnected(self) -> bool:
        return True


class StillThere:
    async def is_disconnected(self) -> bool:
        return False


def test_disconnect_cancels_the_job() -> None:
    job = GenerationJob(input_ids=[1], params=SamplingParams(max_new_tokens=4))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        job._loop, job._future = loop, loop.create_future()

        async def wait_like_scheduler_run() -> Any:  # mirrors BatchScheduler.run's cancel handling
            try:
                await asyncio.shield(job._future)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                job.cancelled.set()
                raise

        with pytest.raises(asyncio.CancelledError):
            await until_disconnect(GoneRequest(), wait_like_scheduler_run())  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert job.cancelled.is_set()  # the batch thread drops the row at its next token and unpins


def test_connected_client_gets_the_result() -> None:
    async def work() -> str:
        await asyncio.sleep(0.3)
        return "done"

    assert asyncio.run(until_disconnect(StillThere(), work())) == "done"  # type: ignore[arg-type]
