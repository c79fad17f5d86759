"""The heap policy around trainings (service/inference/heap.py), observed in the process's resident memory
(Linux /proc/self/statm): memory freed while a holder is inside stays resident; when the last holder leaves it
goes back to the system."""

from __future__ import annotations

import os
import platform
import threading

import pytest
import torch

from service.inference import heap

MIB = 1 << 20
BLOCK = 4 * MIB  # a step's activation size: below the mmap threshold, so it comes from the heap
TOTAL = 256 * MIB


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _allocate_touch_free() -> int:
    """Allocates TOTAL in BLOCK tensors, writes every page, frees them; returns the resident growth while held."""
    before = _resident()
    blocks = [torch.ones(BLOCK // 4, dtype=torch.float32) for _ in range(TOTAL // BLOCK)]
    grown = _resident() - before
    del blocks
    return grown


@pytest.fixture(autouse=True)
def _glibc_heap_trimmed() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.fail("these tests observe glibc's heap; this C library is not glibc")
    assert heap.holders() == 0
    with heap.keep_freed_memory():  # its exit trims: no free memory of earlier tests stays resident to be reused
        pass


def test_freed_memory_stays_while_held_and_returns_at_the_exit() -> None:
    start = _resident()
    with heap.keep_freed_memory():
        assert heap.holders() == 1
        assert _allocate_touch_free() > TOTAL * 3 // 4
        kept = _resident() - start
        assert kept > TOTAL * 3 // 4, f"freed memory returned while held: {kept / MIB:.0f} MiB kept"
    returned = start + kept - _resident()
    assert heap.holders() == 0
    assert returned > TOTAL * 3 // 4, f"only {returned / MIB:.0f} MiB returned at the last exit"


def test_the_last_of_overlapping_holders_returns_the_memory() -> None:
    inside, may_leave = threading.Event(), threading.Event()

    def other_training() -> None:
        with heap.keep_freed_memory():
            inside.set()
            may_leave.wait(10)

    thread = threading.Thread(target=other_training)
    with heap.keep_freed_memory():
        thread.start()
        assert inside.wait(10)
        assert heap.holders() == 2
        grown = _allocate_touch_free()
        freed = _resident()
    first_out = _resident()  # the other holder is still inside
    may_leave.set()
    thread.join(10)
    assert heap.holders() == 0
    assert grown > TOTAL * 3 // 4
    assert freed - first_out < TOTAL // 4, "returned while another holder was inside"
    assert first_out - _resident() > TOTAL * 3 // 4, "not returned when the last holder left"
