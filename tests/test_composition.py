"""The composition root's shutdown (service.composition.stop): no background thread still holds a database
connection when the pools are disposed (on PostgreSQL the garbage collector would close it, with a warning)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from service.db.session import Database, unit_of_work
from service.notices import outbox
from tests.conftest import running_app


def test_stop_waits_for_a_notice_poll_in_progress(
    tmp_path: Path, db_url: str, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_poll = outbox.NoticePoller.poll_once
    polling = threading.Event()

    def slow_poll(self: outbox.NoticePoller) -> int:  # a poll that holds its connection for a while
        with unit_of_work(self._factory) as session:
            session.execute(text("SELECT 1"))
            polling.set()
            time.sleep(0.5)
        return real_poll(self)

    checked_out_at_dispose: list[int] = []
    real_dispose = Database.dispose

    def dispose(self: Database) -> None:
        checked_out_at_dispose.append(self.engine.pool.checkedout())  # type: ignore[attr-defined]
        real_dispose(self)

    monkeypatch.setattr(outbox.NoticePoller, "poll_once", slow_poll)
    monkeypatch.setattr(Database, "dispose", dispose)
    with running_app(tmp_path, tiny_model_path, db_url, notice_poll_s=0.01):
        polling.clear()
        assert polling.wait(10)  # the app stops while a poll holds its connection
    assert checked_out_at_dispose == [0]
