"""Device-side LoRA slots: preallocated A/B tensors per adapted Linear and the mixed-adapter forward.

The only serving code holding adapter weights on the device; it does not know users, files or caches.
Slot 0 is all zeros (base rows); slots 1..num_slots hold adapters, with scaling folded into B.

A forward sees the tokens of one engine step flattened to (T, d_in) (any leading shape is flattened).
Which slot each token uses is the step's `TokenPlan`: the first `len(decode_slots)` tokens are one token
per decoding row, then contiguous segments of one row's prompt chunk (one plain matmul pair each).

The decode rows' term is two dense matmuls, not a batched (rows, 1, d) x (rows, d, r) pair: the A and B of the
distinct slots those rows use are gathered once (while neither rows nor slots change) into A (d_in, U*r) and
B (U*r, d_out); x A gives every row's product with every gathered adapter, a 0/1 mask keeps each row's own
block, and that times B is the row's LoRA term. For 16 rows the extra products cost less than the batched
small matmuls did (a 16-row decode step of the default model in bf16: 25 -> ~9 ms of LoRA time on a 2-vCPU EPYC).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.adapters.peft_format import AdapterWeights, LoraModuleWeights


@dataclass(frozen=True)
class TokenPlan:
    """Slot of every token of a step: decode rows first (one token each), then (start, end, slot) segments.
    `end` None means "to the last token" (a single-row forward whose length the caller did not count)."""

    decode_slots: tuple[int, ...] = ()
    segments: tuple[tuple[int, int | None, int], ...] = ()

    @classmethod
    def rows(cls, slot_ids: Sequence[int], tokens_per_row: int) -> TokenPlan:
        """Equal-length rows (a plain batched forward): row i's tokens use slot_ids[i]."""
        n = tokens_per_row
        return cls((), tuple((i * n, (i + 1) * n, s) for i, s in enumerate(slot_ids)))


class _StepState:
    """Shared by every layer of one LoraSlots: the current plan, and versions that invalidate cached gathers."""

    def __init__(self) -> None:
        self.plan: TokenPlan | None = None
        self.decode_unique: torch.Tensor | None = None  # the distinct slots of the decode rows
        self.decode_block: list[int] = []  # each decode row's index into decode_unique
        # The decode rows' slots of the last plan with decode rows: the engine clears the plan after every
        # step, so comparing with the previous plan alone would re-gather every step.
        self.decode_slots: tuple[int, ...] = ()
        self.decode_version = 0  # bumped when the decode rows' slots change
        self.weights_version = 0  # bumped when a slot's contents change
        self._masks: dict[int, torch.Tensor] = {}  # of the current decode rows, by rank

    def set_decode_slots(self, slots: tuple[int, ...], device: torch.device) -> None:
        unique = sorted(set(slots))
        self.decode_unique = torch.tensor(unique, dtype=torch.long, device=device)
        self.decode_block = [unique.index(s) for s in slots]
        self.decode_slots = slots
        self.decode_version += 1
        self._masks.clear()

    def decode_mask(self, rank: int) -> torch.Tensor:
        """(rows, unique*rank), True OUTSIDE each decode row's own slot block (built once per rows/rank): the
        blocks of the other rows' adapters, filled with 0 in that row's product."""
        key = rank
        mask = self._masks.get(key)
        if mask is None:
            assert self.decode_unique is not None
            width = int(self.decode_unique.numel()) * rank
            cols = torch.arange(width, device=self.decode_unique.device) // rank
            block = torch.tensor(self.decode_block, dtype=torch.long, device=cols.device)
            mask = cols[None, :] != block[:, None]
            self._masks[key] = mask
        return mask


class SlotLoraLinear(nn.Module):
    """y = base(x) + (x A[s]) B[s] per token, s = the token's slot."""

    def __init__(
        self,
        base: nn.Linear,
        num_slots: int,
        max_rank: int,
        state: _StepState,
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
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gathered_key: tuple[int, int, int] = (-1, -1, -1)
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
        self._gathered, self._gathered_key = None, (-1, -1, -1)
        return super()._apply(fn, recurse)  # type: ignore[no-untyped-call]

    def zero(self, slot: int) -> None:
        old = self.ranks[slot]
        if old:
            self.A_slots[slot, :, :old].zero_()
            self.B_slots[slot, :old].zero_()
        self.ranks[slot] = 0

    def _decode_weights(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A (d_in, U*r) and B (U*r, d_out) of the decode rows' U distinct slots, at the largest rank r among
        them (a shorter adapter's tail is zeros), and the rows' block mask; gathered once and kept while
        neither rows nor slots change."""
        st = self._state
        r = max(self.ranks[s] for s in slots)
        if r == 0:
            return None
        key = (st.decode_version, st.weights_version, r)
        if self._gathered is None or self._gathered_key != key:
            assert st.decode_unique is not None
            a = self.A_slots[:, :, :r].index_select(0, st.decode_unique)  # (U, d_in, r)
            b = self.B_slots[:, :r].index_select(0, st.decode_unique)  # (U, r, d_out)
            self._gathered = (a.transpose(0, 1).reshape(self.in_features, -1), b.reshape(-1, self.out_features))
            self._gathered_key = key
        a_all, b_all = self._gathered
        return a_all, b_all, st.decode_mask(r)

    def _add_segment(self, y: torch.Tensor, x: torch.Tensor, start: int, end: int, slot: int) -> None:
        r = self.ranks[slot]
        if r:
            y[start:end] += (x[start:end] @ self.A_slots[slot, :, :r]) @ self.B_slots[slot, :r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        plan = self._state.plan
        if plan is None:
            return y
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        n = len(plan.decode_slots)
        if n:
            gathered = self._decode_weights(plan.decode_slots)
            if gathered is not None:  # ((n, d_in) @ (d_in, U*r), foreign blocks 0) @ (U*r, d_out)
                a_all, b_all, foreign = gathered
                # Filled, not multiplied by 0: another tenant's block that overflowed to inf would give NaN.
                y2[:n].addmm_(torch.mm(x2[:n], a_all).masked_fill_(foreign, 0), b_all)
        for start, end, slot in plan.segments:
            self._add_segment(y2, x2, start, x2.shape[0] if end is None else end, slot)
        return y


class LoraSlots:
    """Wraps the target Linears of a model's decoder layers and manages which adapter sits in which slot.

    Create it after the model is on its device. Not thread-safe: one thread runs load/clear and forwards.
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
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = torch.device(device)
        self._state = _StepState()
        self._in_use: frozenset[int] = frozenset()
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
        if slot in self._in_use:
            raise RuntimeError(f"slot {slot} is in use by the current step")
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
            if not fits_slot(m, layer.A_slots.dtype):  # A and B slots share one dtype
                raise ValueError(f"module {path!r}: weights overflow the slot dtype {layer.A_slots.dtype}")
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
        self._state.weights_version += 1

    def clear(self, slot: int) -> None:
        self._check_slot(slot, allow_base=False)
        if slot in self._in_use:
            raise RuntimeError(f"slot {slot} is in use by the current step")
        for layer in self.layers.values():
            layer.zero(slot)
        self._state.weights_version += 1

    def is_empty(self, slot: int) -> bool:
        return not any(layer.ranks[slot] for layer in self.layers.values())

    def set_plan(self, plan: TokenPlan | None) -> None:
        """Every token's slot for the following forwards (None: no LoRA term anywhere)."""
        st = self._state
        used = set(plan.decode_slots) | {s for *_, s in plan.segments} if plan is not None else set()
        for s in used:
            self._check_slot(s, allow_base=True)
        st.plan, self._in_use = plan, frozenset(used)
        if plan is not None and plan.decode_slots and plan.decode_slots != st.decode_slots:
            st.set_decode_slots(plan.decode_slots, self.device)  # layers re-gather lazily

    @property
    def current_plan(self) -> TokenPlan | None:
        return self._state.plan

    @contextmanager
    def batch(self, slot_ids: Sequence[int], tokens_per_row: int | None = None) -> Iterator[None]:
        """Equal-length rows (a plain (rows, seq) forward) each on its slot; a single row may leave its
        length unsaid. Restores the previous plan on exit."""
        previous = self._state.plan
        if tokens_per_row is None:
            if len(slot_ids) != 1:
                raise ValueError("tokens_per_row is required for more than one row")
            plan = TokenPlan((), ((0, None, slot_ids[0]),))
        else:
            plan = TokenPlan.rows(slot_ids, tokens_per_row)
        self.set_plan(plan)
        try:
            yield
        finally:
            self.set_plan(previous)


def fits_slot(m: LoraModuleWeights, dtype: torch.dtype) -> bool:
    """THE rule for what a slot of `dtype` can hold: lora_A as it is and lora_B times its scale stay finite in
    it. Upload validation applies it with the served dtype (adapters/validation.py): an adapter accepted loads."""
    return _fits(m.a, 1.0, dtype) and _fits(m.b, m.scaling, dtype)


def _fits(t: torch.Tensor, scale: float, dtype: torch.dtype) -> bool:
    """Every element of `t` times `scale` stays finite in `dtype` (an fp16 slot overflows at 65504; bf16 just
    below fp32's maximum), with a margin for rounding to it."""
    if t.numel() == 0:
        return True
    low, high = (float(v) for v in torch.aminmax(t))
    return math.isfinite(low) and math.isfinite(high) and max(-low, high) * scale <= torch.finfo(dtype).max * 0.99


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
