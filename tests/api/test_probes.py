"""The probe routes outside every request cap (/readyz, /metrics) share one run of their work among the callers
meanwhile: a flood of them, with no key, holds one worker thread and one database connection, not one each."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db.migrate import upgrade
from service.db.session import Database
from service.main import create_app
from service.metrics import Metrics
from tests.conftest import live_server, make_settings


def test_a_flood_of_probes_runs_their_work_one_at_a_time(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    app = create_app(make_settings(tmp_path, db, str(tiny_model_path)))
    with live_server(app) as base:
        ping, render = Database.ping, Metrics.render
        running, most = [0], [0]
        lock = threading.Lock()

        def counted(work: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                with lock:
                    running[0] += 1
                    most[0] = max(most[0], running[0])
                try:
                    time.sleep(0.2)  # a slow database: the callers pile up
                    return work(*args, **kwargs)
                finally:
                    with lock:
                        running[0] -= 1

            return run

        monkeypatch.setattr(Database, "ping", counted(ping))
        monkeypatch.setattr(Metrics, "render", counted(render))
        with ThreadPoolExecutor(32) as pool:
            paths = ["/readyz", "/metrics"] * 24
            answers = list(pool.map(lambda p: httpx.get(base + p, timeout=30).status_code, paths))
        assert answers == [200] * len(paths)
        assert most[0] <= 2  # one readiness check and one scrape at a time (was one per caller)
