"""The composition root: its shutdown (service.composition.stop: no background thread still holds a database
connection when the pools are disposed; on PostgreSQL the garbage collector would close it, with a warning),
and what `start` runs in the embedded default (the job reaper)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from service import composition
from service.db.session import Database, unit_of_work
from service.jobs import service as jobs_service
from service.jobs import tasks
from service.notices import outbox
from service.sealing.models import KeyringBase
from tests.conftest import admin_headers, create_user, running_app
from tests.factories import add_history, wait_job


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


def test_keyring_tables_are_created_by_processes_starting_together(tmp_path: Path) -> None:
    # Each starter checks, then creates, table by table: one of them fails on every table another made
    # meanwhile. Three processes once needed more than the single retry there was.
    url = f"sqlite:///{tmp_path / 'keyring.sqlite3'}"
    start, errors = threading.Barrier(6), list[BaseException]()

    def starter() -> None:
        keyring = Database.open(url)
        try:
            start.wait()
            composition._create_keyring_tables(keyring)
        except BaseException as exc:
            errors.append(exc)
        finally:
            keyring.dispose()

    threads = [threading.Thread(target=starter) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_keyring_creation_retries_while_other_starters_create_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = Database.open(f"sqlite:///{tmp_path / 'keyring.sqlite3'}")
    real, calls = KeyringBase.metadata.create_all, [0]

    def raced(*args: object, **kwargs: object) -> None:
        calls[0] += 1
        if calls[0] <= 2:  # two tables, each created by another process between check and create
            raise OperationalError("CREATE TABLE", {}, Exception("table already exists"))
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyringBase.metadata, "create_all", raced)
    monkeypatch.setattr(time, "sleep", lambda _: None)  # the same module object composition uses
    composition._create_keyring_tables(keyring)
    assert calls[0] == 3
    with keyring.engine.connect() as conn:
        tables = {row[0] for row in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
    assert set(KeyringBase.metadata.tables) <= tables
    keyring.dispose()


def test_embedded_jobs_whose_failure_could_not_be_recorded_are_retried_without_a_restart(
    tmp_path: Path, db_url: str, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails during an attempt AND while its failure is recorded: the job stays `running` with no
    heartbeat. The in-process reaper (started by composition.start) requeues it; it then succeeds, and the
    owner's next retrain is a new job, not the stuck one."""
    real_body = tasks.BODIES["user_retrain"]
    recording_failed = threading.Event()

    def down(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("UPDATE jobs", {}, Exception("database unreachable"))

    def record_failure(*_args: object, **_kwargs: object) -> None:
        recording_failed.set()
        down()

    monkeypatch.setitem(tasks.BODIES, "user_retrain", down)
    monkeypatch.setattr(jobs_service, "fail_or_retry", record_failure)
    with running_app(tmp_path, tiny_model_path, db_url, job_stale_after_s=2.0, job_requeue_after_s=2.0) as client:
        key = create_user(client, "ann")
        add_history(client, "ann", key, n=3)
        job = client.post("/admin/users/ann/retrain", headers=admin_headers()).json()
        assert recording_failed.wait(30)
        time.sleep(0.2)  # the attempt's thread leaves run_job: the job is `running` with no heartbeat
        assert client.get(f"/admin/jobs/{job['job_id']}", headers=admin_headers()).json()["status"] == "running"
        monkeypatch.undo()  # the database is back
        assert tasks.BODIES["user_retrain"] is real_body
        assert wait_job(client, job["job_id"], timeout=60)["status"] == "succeeded"
        again = client.post("/admin/users/ann/retrain", headers=admin_headers()).json()
        assert again["job_id"] != job["job_id"]


def test_plaintext_lora_folders_on_disk_are_said_when_sealing_is_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    from service.config import Settings
    from service.sealing import tempfiles

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == "/dev/shm" else real_access(p, mode))
    tempfiles._warn_no_memory_dir.cache_clear()
    with caplog.at_level("WARNING"):
        where = composition.vllm_lora_dir(Settings(data_dir=tmp_path, seal_at_rest=True))
        assert tempfiles.memory_dir() is None
    assert where == tmp_path / "vllm-loras"
    assert "on disk" in caplog.text and "system temp dir" in caplog.text
    tempfiles._warn_no_memory_dir.cache_clear()


def test_a_start_that_fails_half_way_stops_what_it_started(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # start() ran before the lifespan's try/finally: after a failure past the engine's start the engine thread,
    # the reaper and the job runner kept running, and the process could not exit after "startup failed".
    from fastapi.testclient import TestClient

    from service.main import create_app
    from tests.conftest import make_settings

    def failing_poller(*_: object, **__: object) -> None:
        raise RuntimeError("database unavailable")

    monkeypatch.setattr(composition, "start_polling", failing_poller)
    db_url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    from service.db.migrate import upgrade

    upgrade(db_url)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="database unavailable"), TestClient(
        create_app(make_settings(tmp_path, db_url, str(tiny_model_path)))
    ):
        pass
    deadline = time.monotonic() + 5
    while left := [t.name for t in set(threading.enumerate()) - before if t.is_alive() and t.name.startswith("oppu")]:
        assert time.monotonic() < deadline, left
        time.sleep(0.05)
