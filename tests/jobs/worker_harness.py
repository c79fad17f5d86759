"""What the worker-loop tests (tests/jobs/test_worker_loop.py) run in a process of their own.

`python -m tests.jobs.worker_harness REDIS_URL burst|serve DEQUEUE_S` runs service.jobs.worker's WorkerLoop
on RQ workers made as `oppu worker` makes them (rq_workers), with a short dequeue timeout and a 1 s job
monitoring interval (RQ's job heartbeat: an outage mid-job ends RQ's loop within seconds), until it stops;
`hold` is the RQ job they run (no model, no database)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from service.jobs.queue import RedisJobQueue
from service.jobs.worker import WorkerLoop, rq_workers

HOLD = "tests.jobs.worker_harness.hold"  # the job's path, as a queue message names it


def hold(folder: str, name: str) -> None:
    """Notes its start (with its pid), waits for `<name>.release` in `folder` (30 s at most), notes its end."""
    path = Path(folder)
    (path / f"{name}.start").write_text(f"{os.getpid()} {time.time()}")
    deadline = time.monotonic() + 30
    while not (path / f"{name}.release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    (path / f"{name}.end").write_text(str(time.time()))


def main(url: str, mode: str, dequeue_s: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    queue = RedisJobQueue(url, job_timeout_s=60)
    stopping = threading.Event()
    new_worker = rq_workers(queue, stopping, dequeue_timeout_s=int(dequeue_s), job_monitoring_interval=1)
    WorkerLoop(new_worker, queue.ping, stopping, burst=mode == "burst", restart_wait_s=0.2).run()
    logging.getLogger(__name__).info("the worker loop ended")


if __name__ == "__main__":
    main(*sys.argv[1:])
