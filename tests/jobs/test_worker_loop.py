"""service/jobs/worker.py's WorkerLoop: `oppu worker` runs RQ workers one after another until a stop is asked.

A Redis outage mid-job ended RQ's loop while its work horse ran on, untracked: a fresh worker started a second
job meanwhile, a stop signal never reached the horse, and it stayed a zombie; an error with Redis back again,
or RQ's loop returning as if done, ended `oppu worker`. An idle worker whose path to Redis went silent waited
in its dequeue for RQ's 415 s socket timeout. These tests run real workers (a process of their own, against
Redis database 11 through a proxy they control: tests/jobs/tcp_proxy.py) and the loop on fake workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis import ConnectionError as RedisConnectionError

from service.jobs.queue import WORKER_DEQUEUE_TIMEOUT_S, RedisJobQueue
from service.jobs.worker import STOP_JOB_SIGNAL, WorkerLoop, rq_workers
from tests.conftest import REDIS_URL
from tests.factories import redis_url

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB = 11  # flushed before and after: the test owns this database number
HOLD = "tests.jobs.worker_harness.hold"  # the RQ job the harness's workers run (by path: run in its process)


def until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Proxy:
    """tests/jobs/tcp_proxy.py in a process of its own, in front of the test Redis."""

    def __init__(self) -> None:
        target = urlsplit(REDIS_URL)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.jobs.tcp_proxy", target.hostname or "127.0.0.1", str(target.port or 6379)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.popen.stdout is not None
        self.port = int(self.popen.stdout.readline())

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def send(self, command: str) -> None:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()
        assert self.popen.stdout.readline().strip() == "ok"

    def close(self) -> None:
        self.popen.kill()
        self.popen.communicate(timeout=10)


@pytest.fixture
def redis_db() -> Iterator[Any]:
    from redis import Redis

    redis = Redis.from_url(redis_url(REDIS_DB))
    redis.flushdb()
    try:
        yield redis
    finally:
        redis.flushdb()
        redis.close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    server = Proxy()
    try:
        yield server
    finally:
        server.close()


class Harness:
    """tests/jobs/worker_harness.py: a WorkerLoop in a process of its own, its log in `folder`."""

    def __init__(self, folder: Path, url: str, mode: str, dequeue_s: int) -> None:
        self.folder, self.log = folder, folder / "worker.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "tests.jobs.worker_harness", url, mode, str(dequeue_s)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def horse(self, name: str) -> int:
        return int((self.folder / f"{name}.start").read_text().split()[0])

    def kill(self) -> None:
        """Everything it started: its work horses lead process groups of their own."""
        for start in self.folder.glob("*.start"):
            if start.with_suffix(".end").exists():
                continue  # ended: its pid may be another process's by now
            try:
                os.killpg(int(start.read_text().split()[0]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


def enqueue(redis: Any, folder: Path, name: str) -> None:
    from rq import Queue
    from rq.serializers import JSONSerializer

    from service.jobs.queue import QUEUE_NAME

    Queue(QUEUE_NAME, connection=redis, serializer=JSONSerializer).enqueue(HOLD, str(folder), name, job_timeout=60)


def alive(pid: int) -> bool:
    """Running, or a zombie nobody reaped."""
    return Path(f"/proc/{pid}").exists()


@pytest.mark.redis
def test_a_redis_outage_mid_job_leaves_one_job_at_a_time(tmp_path: Path, redis_db: Any, proxy: Proxy) -> None:
    (tmp_path / "b.release").touch()  # b ends at once; a runs until released
    enqueue(redis_db, tmp_path, "a")
    enqueue(redis_db, tmp_path, "b")
    worker = Harness(tmp_path, proxy.url(REDIS_DB), "burst", dequeue_s=1)
    try:
        until(lambda: (tmp_path / "a.start").exists(), 60, f"a did not start\n{worker.text()}")
        proxy.send("down")
        # RQ's job heartbeat fails, its loop ends; the horse running a is waited for, not left behind.
        until(lambda: "still runs its job" in worker.text(), 30, f"RQ's loop did not end\n{worker.text()}")
        proxy.send("up")
        time.sleep(1.5)  # a fresh worker would take b now, beside a
        assert not (tmp_path / "b.start").exists(), worker.text()
        horse_a = worker.horse("a")
        (tmp_path / "a.release").touch()
        assert worker.popen.wait(30) == 0, worker.text()  # the burst ran b, then ended
    finally:
        worker.kill()
    a_ended = float((tmp_path / "a.end").read_text())
    b_started = float((tmp_path / "b.start").read_text().split()[1])
    assert b_started >= a_ended, worker.text()
    assert not alive(horse_a)
    log = worker.text()
    assert f"work horse {horse_a} ended (exit code 0)" in log, log
    assert log.index(f"work horse {horse_a} ended") < log.index("the worker loop ended")


@pytest.mark.redis
def test_an_idle_worker_whose_redis_path_goes_silent_takes_the_next_job(
    tmp_path: Path, redis_db: Any, proxy: Proxy
) -> None:
    (tmp_path / "c.release").touch()
    worker = Harness(tmp_path, proxy.url(REDIS_DB), "serve", dequeue_s=1)
    try:
        until(lambda: redis_db.scard("rq:workers"), 60, f"the worker did not start\n{worker.text()}")
        time.sleep(0.5)  # in its blocking dequeue
        proxy.send("silent")
        silent_at = time.monotonic()
        enqueue(redis_db, tmp_path, "c")
        until(lambda: (tmp_path / "c.end").exists(), 40, f"c did not run\n{worker.text()}")
        took = time.monotonic() - silent_at
        # (A warm stop now would wait up to 60 s in RQ's teardown: its pub/sub thread reads the dead path.)
    finally:
        worker.kill()
    assert took < 1 + 10 + 10, took  # the dequeue timeout + RQ's margin (the socket timeout) + a retry's backoff


@pytest.mark.redis
def test_the_worker_connection_times_out_soon_after_its_dequeue(redis_db: Any) -> None:
    queue = RedisJobQueue(redis_url(REDIS_DB), job_timeout_s=60)
    worker = rq_workers(queue, threading.Event())()
    try:
        options = worker.connection.connection_pool.connection_kwargs
        assert worker.dequeue_timeout == WORKER_DEQUEUE_TIMEOUT_S
        assert worker.dequeue_timeout < options["socket_timeout"] <= 60  # RQ's own: 415 s
        assert options["socket_keepalive"] and options["socket_keepalive_options"]
        assert options["health_check_interval"] == 30
    finally:
        worker.connection.close()
        queue.close()


# --- the loop on fake workers ---


class FakeWorker:
    """RQ's Worker as WorkerLoop uses it: work() runs `script`, which may leave a horse (a real child)."""

    def __init__(self, script: Callable[[FakeWorker], None]) -> None:
        self.script = script
        self.horse_pid = 0
        self.connection = self  # close() is all the loop calls on it
        self.closed = False

    def work(self, *, burst: bool, with_scheduler: bool) -> None:
        self.script(self)

    def close(self) -> None:
        self.closed = True


HORSE = """
import os, signal, sys, time
folder, obeys, seconds = sys.argv[1], sys.argv[2] == "obeys", float(sys.argv[3])
def asked(*_):
    open(os.path.join(folder, "asked"), "w").close()
    if obeys:
        os._exit(0)
signal.signal(signal.SIGUSR1, asked)
open(os.path.join(folder, "ready"), "w").close()
time.sleep(seconds)
open(os.path.join(folder, "end"), "w").close()
"""


def spawn_horse(folder: Path, *, obeys: bool, seconds: float) -> int:
    """A child in a process group of its own, as RQ's work horse; it notes "ready", "asked" (SIGUSR1) and "end"."""
    args = [sys.executable, "-c", HORSE, str(folder), "obeys" if obeys else "ignores", str(seconds)]
    pid = os.posix_spawn(sys.executable, args, os.environ, setpgroup=0)
    until(lambda: (folder / "ready").exists(), 30, "the horse did not start")
    return pid


def loop_of(
    scripts: list[Callable[[FakeWorker], None]], stopping: threading.Event, **kw: Any
) -> tuple[WorkerLoop, list[FakeWorker]]:
    made: list[FakeWorker] = []

    def new_worker() -> FakeWorker:
        made.append(FakeWorker(scripts[len(made)]))
        return made[-1]

    return WorkerLoop(new_worker, kw.pop("redis_up", lambda: True), stopping, restart_wait_s=0.01, **kw), made


def reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def fails(_worker: FakeWorker) -> None:
    raise RedisConnectionError("Connection closed by server.")


def test_an_error_or_an_early_return_is_followed_by_a_fresh_worker() -> None:
    """An error with Redis back again was raised (`oppu worker` exited); a return without a stop ended it."""
    stopping = threading.Event()
    answers = iter([False, False, True, True, True])
    loop, made = loop_of([fails, lambda _w: None, lambda _w: stopping.set()], stopping, redis_up=lambda: next(answers))
    loop.run()
    assert len(made) == 3 and all(w.closed for w in made)


def test_the_next_worker_starts_once_the_horse_left_behind_has_ended(tmp_path: Path) -> None:
    stopping = threading.Event()
    horse: list[int] = []

    def leaves_a_horse(worker: FakeWorker) -> None:
        horse.append(spawn_horse(tmp_path, obeys=True, seconds=1.0))
        worker.horse_pid = horse[0]
        fails(worker)

    def second(_worker: FakeWorker) -> None:
        assert (tmp_path / "end").exists()  # the horse ran its job to its end first
        assert reaped(horse[0])
        stopping.set()

    loop, made = loop_of([leaves_a_horse, second], stopping)
    loop.run()
    assert len(made) == 2 and loop.horse == 0


def test_a_stop_while_the_horse_left_behind_runs_reaches_it(tmp_path: Path) -> None:
    """SIGTERM: the horse is told to stop its job (GracefulWorker's STOP_JOB_SIGNAL), the loop ends after it."""
    assert STOP_JOB_SIGNAL == signal.SIGUSR1  # what the fake horse handles
    stopping = threading.Event()
    horse: list[int] = []

    def leaves_a_horse(worker: FakeWorker) -> None:
        horse.append(spawn_horse(tmp_path, obeys=True, seconds=30.0))
        worker.horse_pid = horse[0]
        fails(worker)

    loop, made = loop_of([leaves_a_horse], stopping)
    stopper = threading.Thread(target=stop_when_waiting, args=(loop, 1))
    stopper.start()
    started = time.monotonic()
    loop.run()
    stopper.join()
    assert time.monotonic() - started < 20
    assert (tmp_path / "asked").exists() and not (tmp_path / "end").exists()
    assert len(made) == 1 and reaped(horse[0])


def test_a_second_stop_kills_the_horse_left_behind(tmp_path: Path) -> None:
    stopping = threading.Event()
    horse: list[int] = []

    def leaves_a_deaf_horse(worker: FakeWorker) -> None:
        horse.append(spawn_horse(tmp_path, obeys=False, seconds=30.0))
        worker.horse_pid = horse[0]
        fails(worker)

    loop, _made = loop_of([leaves_a_deaf_horse], stopping)
    stopper = threading.Thread(target=stop_when_waiting, args=(loop, 2, tmp_path / "asked"))
    stopper.start()
    with pytest.raises(SystemExit):
        loop.run()
    stopper.join()
    assert reaped(horse[0]) and not (tmp_path / "end").exists()
    assert signal.getsignal(signal.SIGTERM) != loop._on_stop_signal  # the test process's own, back again


def stop_when_waiting(loop: WorkerLoop, times: int, between: Path | None = None) -> None:
    """SIGTERM to this process (as a container stop) once the loop waits for a horse; `times` times."""
    deadline = time.monotonic() + 20
    while not loop.horse and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # in waitid
    for n in range(times):
        if n and between is not None:
            while not between.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)
