"""The batched generation loop: left-padded prefill, KV-cached decode, per-row sampling, stops and streaming.

Each row brings its own sampling params and adapter slot; it knows nothing of users, queues or HTTP.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from service.adapters.slots import LoraSlots
from service.engine.types import FinishReason, SamplingParams


@dataclass
class GenRow:
    input_ids: list[int]
    params: SamplingParams
    slot: int = 0


@dataclass
class GenOutput:
    token_ids: list[int]  # emitted tokens; a stop token is not included
    finish_reason: FinishReason
    # float32 (vocab,) on CPU, one per sampled token (the last one chose the stop token when it stopped).
    step_logits: list[torch.Tensor] | None = None


class BatchGenerator:
    """Runs one batch of rows to completion on a model (optionally wrapped by LoraSlots)."""

    def __init__(
        self,
        model: Any,
        *,
        slots: LoraSlots | None,
        pad_token_id: int,
        device: torch.device | str,
        drop_finished: bool = True,
    ) -> None:
        self.model = model
        self.slots = slots
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.drop_finished = drop_finished  # shrink the batch and KV cache when rows finish
        # transformers 5 renamed past_key_values to cache; older releases only know the former.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _check_rows(self, rows: Sequence[GenRow]) -> None:
        top = self.slots.num_slots if self.slots is not None else 0
        for i, row in enumerate(rows):
            if not row.input_ids:
                raise ValueError(f"row {i}: empty prompt")
            if not 0 <= row.slot <= top:
                raise ValueError(f"row {i}: slot {row.slot} out of range 0..{top}")

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.temperature == 0:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return gen

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        kwargs = {self._cache_kw: cache}
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kwargs
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def generate(
        self,
        rows: Sequence[GenRow],
        *,
        on_token: Callable[[int, int], bool] | None = None,
        return_logits: bool = False,
    ) -> list[GenOutput]:
        """Generates for all rows in one batch; on_token(row, token) streams, and returning False cancels."""
        self._check_rows(rows)
        outs = [GenOutput([], "length", [] if return_logits else None) for _ in rows]
        done = [r.params.max_new_tokens == 0 for r in rows]
        if all(done):
            return outs
        gens = [self._generator(r.params) for r in rows]
        ids, mask, pos = self._left_pad(rows)
        next_pos = pos[:, -1] + 1
        active = list(range(len(rows)))  # batch position -> row index
        with torch.inference_mode(), self._slot_batch([r.slot for r in rows]):
            cache = DynamicCache(config=self.model.config)
            logits = self._forward(ids, mask, pos, cache)
            while True:
                chosen = self._choose(logits, [rows[i].params for i in active], [gens[i] for i in active])
                for p, (i, tok) in enumerate(zip(active, chosen.tolist(), strict=True)):  # one sync per step
                    if not done[i]:
                        step_logits = outs[i].step_logits
                        if step_logits is not None:
                            step_logits.append(logits[p].float().cpu())
                        done[i] = self._emit(i, tok, rows[i].params, outs[i], on_token)
                if all(done):
                    return outs
                keep = [p for p, i in enumerate(active) if not done[i]]
                if self.drop_finished and len(keep) < len(active):
                    sel = torch.tensor(keep, dtype=torch.long, device=self.device)
                    cache.batch_select_indices(sel)
                    mask, next_pos, chosen = mask[sel], next_pos[sel], chosen[sel]
                    active = [active[p] for p in keep]
                    if self.slots is not None:
                        self.slots.set_batch([rows[i].slot for i in active])
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                logits = self._forward(chosen[:, None], mask, next_pos[:, None], cache)
                next_pos = next_pos + 1

    def _left_pad(self, rows: Sequence[GenRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention_mask, position_ids), each (batch, longest prompt) with the prompts right-aligned."""
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.input_ids) :] = torch.tensor(row.input_ids, dtype=torch.long)
            mask[i, width - len(row.input_ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count from each row's first real token
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def _slot_batch(self, slot_ids: list[int]) -> AbstractContextManager[None]:
        return nullcontext() if self.slots is None else self.slots.batch(slot_ids)

    @staticmethod
    def _emit(
        i: int, tok: int, params: SamplingParams, out: GenOutput, on_token: Callable[[int, int], bool] | None
    ) -> bool:
        """Records one token for row i; returns True when the row is finished."""
        if tok in params.stop_token_ids:
            out.finish_reason = "stop"
            return True
        out.token_ids.append(tok)
        if on_token is not None and on_token(i, tok) is False:
            out.finish_reason = "cancelled"
            return True
        return len(out.token_ids) >= params.max_new_tokens  # finish_reason stays "length"

    @staticmethod
    def _choose(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]) -> torch.Tensor:
        """(batch, vocab) -> (batch,) token ids: argmax for greedy rows, seeded top-p sampling for others."""
        chosen = logits.argmax(dim=-1)
        for p, (prm, gen) in enumerate(zip(params, gens, strict=True)):
            if gen is not None:  # a per-row generator: the draw depends only on this row's seed
                chosen[p] = _sample(logits[p], prm.temperature, prm.top_p, gen)
        return chosen


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    scaled = logits.float()
    # Subtract the max BEFORE dividing: a tiny temperature would otherwise make inf - inf = NaN.
    probs = torch.softmax((scaled - scaled.max()) / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=gen)[0]
    sorted_p, order = probs.sort(descending=True, stable=True)
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    sorted_p = sorted_p * ((sorted_p.cumsum(0) - sorted_p) < top_p)
    return order[torch.multinomial(sorted_p, 1, generator=gen)[0]]
