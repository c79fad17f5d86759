"""Iteration-level scheduling: which rows run in the next step and how much of each.

Every step, each decoding row contributes one token; the rest of the step's token budget goes to prompt
chunks of rows still in prefill, first-admitted first (so a long prompt is spread over steps instead of
freezing the running streams). Pure bookkeeping: no torch, no threads, no I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.builtin.executor import Chunk, StepBatch
from service.engine.builtin.sampler import RowDecoder
from service.engine.types import EngineRequest

Sink = Callable[[object], None]  # delivers a TokenEvent, a Finished or an exception to the requester


@dataclass(eq=False)
class Row:
    request: EngineRequest
    sink: Sink
    decoder: RowDecoder
    lane: int = -1
    slot: int = 0
    prefilled: int = 0  # prompt tokens whose K/V are in the lane
    kv_len: int = 0  # positions of the lane written by this row
    output: list[int] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_step: int = 0  # steps the engine had run when the row was queued
    first_step: int | None = None  # the step that produced its first token (tests, metrics)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len

    @property
    def scoring(self) -> bool:
        return self.request.score_from is not None


@dataclass(frozen=True)
class Sample:
    """Logit row `index` gives `row` its next token."""

    row: Row
    index: int


@dataclass(frozen=True)
class Score:
    """Logit row `index` scores prompt token `position` of `row` (its logprob given the tokens before it)."""

    row: Row
    index: int
    position: int


@dataclass
class Step:
    batch: StepBatch
    samples: list[Sample]
    scores: list[Score]
    prefilled: list[tuple[Row, int]]  # (row, prompt tokens it wrote this step)


@dataclass
class _Builder:
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    lanes: list[int] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)

    def logit_row(self, flat_index: int) -> int:
        self.logit_rows.append(flat_index)
        return len(self.logit_rows) - 1


def plan_step(running: list[Row], budget: int) -> Step | None:
    """Decode tokens of every decoding row, then prompt chunks in admission order, within `budget` tokens."""
    b = _Builder()
    samples: list[Sample] = []
    scores: list[Score] = []
    prefilled: list[tuple[Row, int]] = []
    for row in sorted((r for r in running if r.decoding and r.output), key=lambda r: r.lane):
        samples.append(Sample(row, b.logit_row(len(b.ids))))
        b.ids.append(row.output[-1])
        b.positions.append(row.kv_len)
        b.lanes.append(row.lane)
        b.decode_slots.append(row.slot)
    left = budget - len(b.ids)
    for row in running:
        if left <= 0:
            break
        if row.decoding:
            continue
        n = min(row.prompt_len - row.prefilled, left)
        _add_chunk(b, row, n, samples, scores)
        prefilled.append((row, n))
        left -= n
    if not b.ids:
        return None
    batch = StepBatch(b.ids, b.positions, b.lanes, b.decode_slots, b.chunks, b.logit_rows)
    return Step(batch, samples, scores, prefilled)


def _add_chunk(b: _Builder, row: Row, n: int, samples: list[Sample], scores: list[Score]) -> None:
    start, pos = len(b.ids), row.prefilled
    b.chunks.append(Chunk(start, n, row.lane, pos, row.slot))
    b.ids.extend(row.request.prompt_ids[pos : pos + n])
    b.positions.extend(range(pos, pos + n))
    b.lanes.extend([row.lane] * n)
    if row.scoring:  # logits at p score prompt token p + 1
        first = max(pos, (row.request.score_from or 1) - 1)
        for p in range(first, min(pos + n, row.prompt_len - 1)):
            scores.append(Score(row, b.logit_row(start + p - pos), p + 1))
    if pos + n == row.prompt_len and row.request.sampling.max_new_tokens > 0:
        samples.append(Sample(row, b.logit_row(start + n - 1)))
