"""The builtin engine's KV lanes: a released lane is zero wherever its row wrote, whatever the row reports, so the
next occupant's masked-out positions are finite."""

from __future__ import annotations

import torch

from service.engine.builtin.kv import KVLanes


def lanes() -> KVLanes:
    return KVLanes(
        layers=2, lanes=2, kv_heads=2, head_dim=4, capacity=32, device=torch.device("cpu"), dtype=torch.float32
    )


def write_nan(kv: KVLanes, lane: int, end: int) -> None:
    """A row's forward writing non-finite K/V at positions [0, end) of its lane, as the executor does."""
    positions = torch.arange(end)
    at = torch.full((end,), lane)
    poison = torch.full((end, 2, 4), float("nan"))
    for layer in range(len(kv.k)):
        kv.write(layer, at, positions, poison, poison)
    kv.mark_written(lane, end)


def clean_past(kv: KVLanes, lane: int, length: int, width: int) -> bool:
    """What a row of `length` on `lane` decoding beside a row of `width` reads past its own positions is zero."""
    kv.ensure_clean(lane, lane + 1, width)
    return all(bool((t[lane, :, length:width] == 0).all()) for t in kv.k + kv.v)


def test_a_released_lane_is_zero_where_its_row_wrote_beyond_what_it_reported() -> None:
    """The reviewed finding: a scoring row ended by its own non-finite logits reported only its prompt (10
    positions) while its continuation had written 2 more; ensure_clean never zeroes below what was written."""
    kv = lanes()
    lane = kv.acquire()
    assert lane == 0
    write_nan(kv, lane, 12)
    kv.release(lane, 10)
    assert kv.acquire() == lane
    assert clean_past(kv, lane, 3, 20)


def test_a_lane_released_with_no_length_is_zero_where_its_row_wrote() -> None:
    """A step that failed: its rows end reporting nothing of what the step wrote (the engine marks it)."""
    kv = lanes()
    first = kv.acquire()
    assert first is not None
    write_nan(kv, first, 20)  # an earlier occupant, released cleanly: the lane is clean to 20
    kv.release(first, 20)
    lane = kv.acquire()
    assert lane == first
    write_nan(kv, lane, 8)
    kv.release(lane, 0)
    assert kv.acquire() == lane
    assert clean_past(kv, lane, 2, 24)


def test_release_zeroes_only_since_the_last_release() -> None:
    """The mark restarts at each release: a short row after a long one zeroes its own positions, not the long
    row's again (release costs what the row wrote, and nothing per step)."""
    kv = lanes()
    lane = kv.acquire()
    assert lane is not None
    write_nan(kv, lane, 30)
    kv.release(lane, 30)
    assert kv.acquire() == lane
    kv.k[0][lane, :, 20] = 7.0  # not written by this row, so its release leaves it
    write_nan(kv, lane, 4)
    kv.release(lane, 4)
    assert bool((kv.k[0][lane, :, :4] == 0).all()) and bool((kv.k[0][lane, :, 20] == 7.0).all())
