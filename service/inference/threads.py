"""The OpenMP pools behind torch's CPU parallelism, and the rule for giving them back.

torch runs the parallel part of a CPU op on an OpenMP pool that belongs to the calling thread, and the pool
outlives the op: its workers sleep until that thread's next parallel op. libgomp counts the workers of every
pool in the process, and while they outnumber the CPUs it stops spin-waiting in all of them, so each parallel
region of every thread then begins with a futex wake-up. A server has several threads that touch torch (the one
that loads the model, request threads that read adapters, the engine's, a training job's): once a second one
has held a pool, every small op of an engine step pays that price. On a 2-vCPU EPYC (bf16, 2 threads) a
16-row decode step of the default model took 147 ms on a worker thread while another thread kept an idle pool,
74 ms when none did (`bench/engine_step.py --thread worker-idle-pool` / `--thread worker`, in
bench/results/engine-step-avx512bf16.json).

The rule: a thread gives its pool back (`release_pool`) once it is done with torch for a while: the thread that
loaded the model, a request thread after reading an adapter, a finished training, the builtin engine when it goes
idle (not the vLLM engine: vLLM may have pinned its pool's threads to CPUs). The next parallel op of that thread
builds a new pool (one thread start per worker). Callers decide when; this module knows no engine, model or
setting.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import torch  # noqa: F401  (loads the OpenMP runtime this module looks up)

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: give back the threads, keep nothing that must be rebuilt by hand


@functools.cache
def _pause_all() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` (OpenMP 5.0) of the runtime torch loaded, or None where there is none."""
    try:
        fn = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError):  # a runtime older than OpenMP 5.0, or not in the global namespace
        log.info("the OpenMP runtime has no omp_pause_resource_all: idle threads keep their pools")
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    pause: Callable[[int], int] = fn
    return pause


def release_pool() -> None:
    """The calling thread's OpenMP pool goes away (a no-op if it has none, or inside a parallel region)."""
    pause = _pause_all()
    if pause is not None:
        pause(OMP_PAUSE_SOFT)
