"""The C heap's policy while a training runs: memory a step frees stays in the process for the next step, and
goes back to the system once, when the last training ends.

torch's CPU tensors come from glibc's malloc. By default glibc returns the free top of its heap to the system as
soon as more than its trim threshold (a few MiB once it has adapted) is free there, and a training step frees
nearly all it allocated (the saved activations, at the end of its backward): every step handed its working set
back and took it again, page by page (a fault and a zeroed page each), ~60 MB a step. On a 2-vCPU AVX2-only EPYC
(fp32, 100 MovieLens items) a user's training took 28.4 s with glibc's default policy and 26.7 s with freed memory
kept (glibc's MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ set, bench/training.py, one process each); the same
effect is what jemalloc or tcmalloc give torch on CPUs.

`keep_freed_memory` raises the trim threshold while any caller is inside (trainings may overlap: the first in
sets it, the last out lowers it and trims once). Setting either threshold switches off glibc's adaptive ones, so
both are set to what the adaptive rule reaches in a long-running process (allocations of 32 MiB or more mapped on
their own, 64 MiB of free top kept). A no-op where the C library is not glibc. Knows nothing of models or jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the adaptive threshold's ceiling
IDLE_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # the adaptive rule's trim threshold at that ceiling
HOLDING_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: in effect, never trim while held


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (mallopt and malloc_trim), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        for name in ("mallopt", "malloc_trim"):
            getattr(libc, name).argtypes = [ctypes.c_int] * (2 if name == "mallopt" else 1)
            getattr(libc, name).restype = ctypes.c_int
    except (AttributeError, OSError):
        log.info("glibc's mallopt/malloc_trim not found: the heap keeps its default policy")
        return None
    return libc


class _Holders:
    """How many callers are inside keep_freed_memory, and the policy changes at 0 -> 1 and 1 -> 0."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def enter(self, libc: ctypes.CDLL) -> None:
        with self._lock:
            self.count += 1
            if self.count == 1:
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, HOLDING_TRIM_THRESHOLD)

    def leave(self, libc: ctypes.CDLL) -> None:
        with self._lock:
            self.count -= 1
            if self.count == 0:
                libc.mallopt(M_TRIM_THRESHOLD, IDLE_TRIM_THRESHOLD)
                libc.malloc_trim(0)  # what the trainings left free goes back now, once


_holders = _Holders()


def holders() -> int:
    """Callers inside keep_freed_memory now (0 where the policy is not available)."""
    return _holders.count


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Freed memory stays in the process while the block runs; at the last holder's exit it is returned."""
    libc = _glibc()
    if libc is None:
        yield
        return
    _holders.enter(libc)
    try:
        yield
    finally:
        _holders.leave(libc)
