"""A non-streaming client that goes away: its generation is cancelled, so the scheduler frees the row."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from service.api.generate import until_disconnect
from service.batching.scheduler import BatchScheduler, GenerationJob
from service.inference.engine import GenOutput, SamplingParams


class GoneRequest:
    async def is_disconnected(self) -> bool:
        return True


class StillThere:
    async def is_disconnected(self) -> bool:
        return False


class EndlessGenerator:
    """Emits tokens until its row is cancelled (the real engine stops a row when on_token says False)."""

    def generate(self, rows: Any, *, on_token: Any = None, return_logits: bool = False) -> list[GenOutput]:
        out = GenOutput(token_ids=[], finish_reason="length", step_logits=None)
        for _ in range(1000):
            time.sleep(0.01)
            if on_token(0, 7) is False:
                out.finish_reason = "cancelled"
                break
            out.token_ids.append(7)
        return [out]


def test_disconnect_cancels_the_row_in_the_real_scheduler() -> None:
    scheduler = BatchScheduler(EndlessGenerator(), max_batch=4, window_ms=1, queue_max=8)  # type: ignore[arg-type]
    scheduler.start()
    job = GenerationJob(input_ids=[1], params=SamplingParams(max_new_tokens=1000))
    try:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(until_disconnect(GoneRequest(), scheduler.run(job)))  # type: ignore[arg-type]
        assert job.cancelled.is_set()
        deadline = time.monotonic() + 5
        while job.result is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.result is not None and job.result.finish_reason == "cancelled"
        assert len(job.result.token_ids) < 1000 and scheduler.queued == 0
    finally:
        scheduler.stop()


def test_connected_client_gets_the_result() -> None:
    async def work() -> str:
        await asyncio.sleep(0.3)
        return "done"

    assert asyncio.run(until_disconnect(StillThere(), work())) == "done"  # type: ignore[arg-type]
