"""Device-side LoRA slots: preallocated A/B tensors per adapted Linear and the gathered-matmul forward.

The only serving code holding adapter weights on the device; it does not know users, files or caches.
Slot 0 is all zeros (base rows); slots 1..num_slots hold adapters, with scaling folded into B.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from service.adapters.peft_format import AdapterWeights

# A plan is what one layer does for the current batch: None (no LoRA term), or (A, B) with 2-D tensors
# (one shared slot: plain matmuls), 3-D tensors (per-row weights, gathered once per batch), or
# (A_slots view, B_slots view) with gather=True when over the cache budget (gathered every forward).
_Plan = tuple[torch.Tensor, torch.Tensor, bool] | None


class _BatchState:
    """Shared by all layers of one LoraSlots: the current rows' slots and a version that invalidates plans."""

    def __init__(self, cache_budget: int) -> None:
        self.slot_ids: tuple[int, ...] | None = None
        self.idx: torch.Tensor | None = None  # (batch,) int64 on the model device
        self.unique: frozenset[int] = frozenset()
        self.version = 0
        self.cache_budget = cache_budget
        self.cache_left = cache_budget


class SlotLoraLinear(nn.Module):
    """y = base(x) + (x A[s]) B[s] per row, s = the row's slot; one (batched) matmul pair, no Python loop."""

    def __init__(
        self,
        base: nn.Linear,
        num_slots: int,
        max_rank: int,
        state: _BatchState,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        # A (slots, d_in, r_max), B (slots, r_max, d_out), stored transposed (PEFT's per-module layout) so that
        # a swap copies PEFT's tensors straight in; not persistent: kept out of the model's state dict.
        a = torch.zeros(num_slots + 1, max_rank, base.in_features, device=device, dtype=dtype).transpose(1, 2)
        b = torch.zeros(num_slots + 1, base.out_features, max_rank, device=device, dtype=dtype).transpose(1, 2)
        self.A_slots: torch.Tensor
        self.B_slots: torch.Tensor
        self.register_buffer("A_slots", a, persistent=False)
        self.register_buffer("B_slots", b, persistent=False)
        self.ranks = [0] * (num_slots + 1)  # host-side: rank loaded per slot, 0 = all zeros
        self._state = state
        self._plan: _Plan = None
        self._plan_version = -1
        self._fill_views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a slot in PEFT's layout, lora_A (rank, d_in) and lora_B (d_out, rank), to be filled."""
        old = self.ranks[slot]
        if old > rank:  # a shorter rank than the previous occupant: zero the stale tail
            self.A_slots[slot, :, rank:old].zero_()
            self.B_slots[slot, rank:old].zero_()
        self.ranks[slot] = rank
        views = self._fill_views.get((slot, rank))
        if views is None:  # cached: building ~240 views per swap would cost a third of its time
            views = self.A_slots[slot, :, :rank].t(), self.B_slots[slot, :rank].t()
            self._fill_views[(slot, rank)] = views
        return views

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # model.to()/half() replace the buffers: drop every view of the old ones.
        self._fill_views.clear()
        self._plan_version = -1
        return super()._apply(fn, recurse)  # type: ignore[no-untyped-call]

    def zero(self, slot: int) -> None:
        old = self.ranks[slot]
        if old:
            self.A_slots[slot, :, :old].zero_()
            self.B_slots[slot, :old].zero_()
        self.ranks[slot] = 0

    def _build_plan(self) -> _Plan:
        st = self._state
        if st.idx is None or not any(self.ranks[s] for s in st.unique):
            return None  # fast path: no row of this batch has weights here
        r = max(self.ranks[s] for s in st.unique)  # trim to the ranks actually in use
        if len(st.unique) == 1:
            (s,) = st.unique
            return self.A_slots[s, :, :r], self.B_slots[s, :r], False
        a_all, b_all = self.A_slots[:, :, :r], self.B_slots[:, :r]
        size = st.idx.numel() * (self.in_features + self.out_features) * r * a_all.element_size()
        if size > st.cache_left:
            return a_all, b_all, True
        st.cache_left -= size
        return a_all.index_select(0, st.idx), b_all.index_select(0, st.idx), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        if self._plan_version != self._state.version:
            self._plan = self._build_plan()
            self._plan_version = self._state.version
        if self._plan is None:
            return y
        a, b, gather = self._plan
        if a.dim() == 2:  # one slot for every row: x (..., d_in) @ A (d_in, r) @ B (r, d_out)
            return y + (x @ a) @ b
        idx = self._state.idx
        assert idx is not None
        if x.shape[0] != idx.shape[0]:
            raise ValueError(f"batch has {x.shape[0]} rows but slots were set for {idx.shape[0]}")
        if gather:
            a, b = a.index_select(0, idx), b.index_select(0, idx)
        # x (batch, seq, d_in) @ A (batch, d_in, r) -> (batch, seq, r) @ B (batch, r, d_out) + y
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        out = torch.baddbmm(y.reshape(x3.shape[0], x3.shape[1], -1), torch.bmm(x3, a), b)
        return out.view_as(y)


class LoraSlots:
    """Wraps the target Linears of a model's decoder layers and manages which adapter sits in which slot.

    Create it after the model is on its device. Not thread-safe: one loop runs load/clear and forwards.
    """

    def __init__(
        self,
        model: nn.Module,
        num_slots: int,
        max_rank: int,
        target_modules: Sequence[str],
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        gather_cache_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = torch.device(device)
        self._state = _BatchState(gather_cache_bytes)
        self.layers: dict[str, SlotLoraLinear] = {}
        targets = set(target_modules)
        for path, parent, leaf, child in _decoder_linears(model, targets):
            layer = SlotLoraLinear(child, num_slots, max_rank, self._state, device=self.device, dtype=dtype)
            setattr(parent, leaf, layer)
            self.layers[path] = layer
        if not self.layers:
            raise ValueError(f"no Linear named {sorted(targets)} inside the model's decoder layers")

    def _check_slot(self, slot: int, *, allow_base: bool) -> None:
        low = 0 if allow_base else 1
        if not low <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} out of range {low}..{self.num_slots}")

    def load(self, slot: int, weights: AdapterWeights) -> None:
        """Copies an adapter into a slot; modules it does not target are zeroed there. All-or-nothing."""
        self._check_slot(slot, allow_base=False)
        if slot in self._state.unique:
            raise RuntimeError(f"slot {slot} is in use by the running batch")
        if weights.rank > self.max_rank:
            raise ValueError(f"adapter rank {weights.rank} exceeds max_rank {self.max_rank}")
        for path, m in weights.modules.items():
            layer = self.layers.get(path)
            if layer is None:
                raise ValueError(f"adapter targets unknown module {path!r}")
            if m.a.shape[1] != layer.in_features or m.b.shape[0] != layer.out_features:
                raise ValueError(
                    f"module {path!r}: adapter is {m.a.shape[1]}->{m.b.shape[0]}, "
                    f"model is {layer.in_features}->{layer.out_features}"
                )
        dst_a, dst_b, src_a, src_b, scales = [], [], [], [], []
        for path, layer in self.layers.items():
            if path not in weights.modules:
                layer.zero(slot)
                continue
            m = weights.modules[path]
            a, b = layer.prepare(slot, m.rank)
            dst_a.append(a)
            dst_b.append(b)
            src_a.append(m.a)
            src_b.append(m.b)
            scales.append(m.scaling)
        if dst_a:
            _copy_scaled(dst_a, dst_b, src_a, src_b, scales)
        self._state.version += 1

    def clear(self, slot: int) -> None:
        self._check_slot(slot, allow_base=False)
        if slot in self._state.unique:
            raise RuntimeError(f"slot {slot} is in use by the running batch")
        for layer in self.layers.values():
            layer.zero(slot)
        self._state.version += 1

    def is_empty(self, slot: int) -> bool:
        return not any(layer.ranks[slot] for layer in self.layers.values())

    @property
    def current_batch(self) -> tuple[int, ...] | None:
        return self._state.slot_ids

    def set_batch(self, slot_ids: Sequence[int] | None) -> None:
        """Sets each row's slot for the following forwards (None: no LoRA term anywhere)."""
        st = self._state
        if slot_ids is None:
            st.slot_ids, st.idx, st.unique = None, None, frozenset()
        else:
            ids = tuple(int(s) for s in slot_ids)
            for s in ids:
                self._check_slot(s, allow_base=True)
            # One host->device copy per batch; layers never sync on it.
            st.slot_ids, st.unique = ids, frozenset(ids)
            st.idx = torch.tensor(ids, dtype=torch.long, device=self.device)
        st.cache_left = st.cache_budget
        st.version += 1

    @contextmanager
    def batch(self, slot_ids: Sequence[int]) -> Iterator[None]:
        """Rows' slots for all forwards inside the block; restores the previous setting on exit."""
        previous = self._state.slot_ids
        self.set_batch(slot_ids)
        try:
            yield
        finally:
            self.set_batch(previous)


def _copy_scaled(
    dst_a: list[torch.Tensor],
    dst_b: list[torch.Tensor],
    src_a: list[torch.Tensor],
    src_b: list[torch.Tensor],
    scales: list[float],
) -> None:
    """dst_a <- src_a, dst_b <- scale * src_b; one fused call per list: swaps are on the request path."""
    torch._foreach_copy_(dst_a, src_a)
    if dst_b[0].dtype == torch.float32 and all(b.dtype == torch.float32 for b in src_b):
        torch._foreach_copy_(dst_b, src_b)
        torch._foreach_mul_(dst_b, scales)
    else:  # scale in float32 first, so that the product is rounded to the slot dtype only once
        torch._foreach_copy_(dst_b, torch._foreach_mul([b.float() for b in src_b], scales))


def _decoder_linears(model: nn.Module, targets: set[str]) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(path, parent, leaf, linear) for target Linears below a ModuleList (the decoder stack, not lm_head)."""
    found: list[tuple[str, nn.Module, str, nn.Linear]] = []
    stack_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for name, parent in model.named_modules():
        if isinstance(parent, SlotLoraLinear):
            raise ValueError("model already has LoRA slots")
        for leaf, child in parent.named_children():
            path = f"{name}.{leaf}" if name else leaf
            in_stack = any(path.startswith(p) for p in stack_prefixes)
            if leaf in targets and type(child) is nn.Linear and in_stack:
                found.append((path, parent, leaf, child))
    return found
