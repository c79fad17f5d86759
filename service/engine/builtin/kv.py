"""KV memory of the builtin engine: `lanes` preallocated rows of `capacity` positions per decoder layer.

A running row owns one lane from admission to its end, so its KV memory is reserved up front and bounded:
lanes x capacity x bytes_per_token in all (`bytes`). Lanes are allocated lowest-first, so busy lanes stay
packed at the front and a decode attention call reads one slice of lanes without copying. Memory comes from
torch.empty (the OS commits pages only when written); the region each attention reads beyond a row's own
length is zeroed first, and a released lane is zeroed up to the highest position written since it was last
zeroed (whatever its row's bookkeeping says), so a hostile row's NaN can never reach the next occupant's
masked-out positions.
"""

from __future__ import annotations

import torch


class KVLanes:
    def __init__(
        self,
        *,
        layers: int,
        lanes: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (lanes, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.lanes = lanes
        self.capacity = capacity
        self.bytes = 2 * layers * lanes * kv_heads * capacity * head_dim * self.k[0].element_size()
        self._free = list(range(lanes - 1, -1, -1))  # pop() gives the lowest lane
        self._clean_to = [0] * lanes  # positions [0, clean_to) of the lane hold finite values
        # Positions [0, written_to) may hold what rows wrote since the lane was last zeroed. Kept by the lanes, not
        # the rows: a row's own length can miss positions it wrote (a step that failed half-way, a row ended
        # while its step's tokens were still being counted), and ensure_clean never zeroes below clean_to.
        self._written_to = [0] * lanes

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        if not self._free:
            return None
        return self._free.pop()

    def release(self, lane: int, written: int = 0) -> None:
        """Zero every position written since the lane was last zeroed (at least [0, written): what its row says it
        wrote), then free the lane."""
        end = max(written, self._written_to[lane])
        if end:
            for k, v in zip(self.k, self.v, strict=True):
                k[lane, :, :end].zero_()
                v[lane, :, :end].zero_()
            self._clean_to[lane] = max(self._clean_to[lane], end)
        self._written_to[lane] = 0
        self._free.append(lane)
        self._free.sort(reverse=True)

    def ensure_clean(self, lo: int, hi: int, length: int) -> None:
        """Lanes [lo, hi) hold finite values up to `length` (a decode attention call reads that far in each)."""
        for lane in range(lo, hi):
            start = self._clean_to[lane]
            if start < length:
                for k, v in zip(self.k, self.v, strict=True):
                    k[lane, :, start:length].zero_()
                    v[lane, :, start:length].zero_()
                self._clean_to[lane] = length

    def write(self, layer: int, lanes: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (tokens, kv_heads, head_dim) go to (lane, position) of each token."""
        self.k[layer][lanes, :, positions] = k
        self.v[layer][lanes, :, positions] = v

    def mark_written(self, lane: int, end: int) -> None:
        """Positions up to `end` of the lane were written (or are about to be: a step that may fail half-way)."""
        if end > self._written_to[lane]:
            self._written_to[lane] = end
            if end > self._clean_to[lane]:
                self._clean_to[lane] = end
