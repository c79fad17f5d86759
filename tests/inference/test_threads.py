"""The OpenMP pool rule (service/inference/threads.py): a thread that gives its pool back leaves no idle pool
threads behind (Linux: counted in /proc/self/task)."""

from __future__ import annotations

import os
import threading

import torch

from service.inference.threads import release_pool


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_release_pool_gives_back_the_threads_of_the_calling_threads_pool() -> None:
    counts: dict[str, int] = {}
    previous = torch.get_num_threads()

    def work() -> None:
        torch.set_num_threads(2)  # a pool of 2: this thread and one OpenMP worker, even on one CPU
        counts["before"] = _threads()
        a = torch.randn(1024, 1024)
        torch.mm(a, a)  # a parallel region: this thread's pool is built and kept
        counts["kept"] = _threads()
        release_pool()
        counts["released"] = _threads()
        release_pool()  # no pool: a no-op
        counts["again"] = _threads()

    try:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(previous)
    assert counts["kept"] > counts["before"], counts
    assert counts["released"] == counts["before"] == counts["again"], counts
