"""A non-streaming client that goes away: its generation is cancelled, so the engine frees the row."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from service.api.generate import until_disconnect
from service.engine.base import collect
from service.engine.builtin.scheduler import Row
from tests.adapters.test_slots import tiny_model
from tests.engine.test_builtin import make_engine, prompt, request


class GoneRequest:
    async def is_disconnected(self) -> bool:
        return True


class StillThere:
    async def is_disconnected(self) -> bool:
        return False


def test_disconnect_cancels_the_row_in_the_real_engine(tmp_path: Path) -> None:
    engine = make_engine(tiny_model(), slots=2, rows=2)
    engine.start()
    rows: list[Row] = []
    real_submit = engine.submit

    def submit(row: Row) -> None:
        rows.append(row)
        real_submit(row)

    engine.submit = submit  # type: ignore[method-assign]
    try:
        req = request(prompt(1, 8), 240, ignore_eos=True)
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(until_disconnect(GoneRequest(), collect(engine, req)))  # type: ignore[arg-type]
        (row,) = rows
        assert row.cancelled.is_set()
        deadline = time.monotonic() + 5
        while engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats().running == 0 and engine.stats().waiting == 0
        assert len(row.output) < 240  # it stopped early
    finally:
        engine.stop()


def test_connected_client_gets_the_result() -> None:
    async def work() -> str:
        await asyncio.sleep(0.3)
        return "done"

    assert asyncio.run(until_disconnect(StillThere(), work())) == "done"  # type: ignore[arg-type]
