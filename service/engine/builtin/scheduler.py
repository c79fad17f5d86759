"""Iteration-level scheduling: which rows run in the next step and how much of each.

Every step, each decoding row contributes one token; the rest of the step's token budget goes to prompt
chunks of rows still in prefill, first-admitted first (so a long prompt is spread over steps instead of
freezing the running streams). A scoring row, once its prompt is in, runs its continuations (each whole,
as many as fit) stored side by side after the prompt. Pure bookkeeping: no torch, no threads, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.engine.base import EngineRow
from service.engine.builtin.executor import Chunk, StepBatch
from service.engine.builtin.sampler import RowDecoder


@dataclass(eq=False)
class Row(EngineRow):
    decoder: RowDecoder
    lane: int = -1
    slot: int = 0
    prefilled: int = 0  # prompt tokens whose K/V are in the lane
    kv_len: int = 0  # positions of the lane written by this row
    output: list[int] = field(default_factory=list)
    next_continuation: int = 0  # scoring: continuations run so far
    continuation_logprobs: list[list[float]] = field(default_factory=list)
    prompt_end_logprobs: object | None = None  # scoring: log-softmax after the prompt (every continuation's 1st token)
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
        return bool(self.request.continuations)

    @property
    def scored(self) -> bool:
        return self.next_continuation == len(self.request.continuations)


@dataclass(frozen=True)
class Sample:
    """Logit row `index` gives `row` its next token."""

    row: Row
    index: int


@dataclass(frozen=True)
class Score:
    """Logit row `index` scores token `token` of continuation `continuation` of `row` (token -1: the row's
    last prompt position, whose distribution scores the first token of every continuation)."""

    row: Row
    index: int
    continuation: int
    token: int


@dataclass
class Step:
    batch: StepBatch
    samples: list[Sample]
    scores: list[Score]
    prefilled: list[tuple[Row, int]]  # (row, prompt tokens it wrote this step)
    continued: list[tuple[Row, int]]  # (scoring row, continuations it ran this step)


@dataclass
class _Builder:
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    stores: list[int] = field(default_factory=list)
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
        b.stores.append(row.kv_len)
        b.lanes.append(row.lane)
        b.decode_slots.append(row.slot)
    left = budget - len(b.ids)
    continued: list[tuple[Row, int]] = []
    for row in running:
        if left <= 0:
            break
        if not row.decoding:
            n = min(row.prompt_len - row.prefilled, left)
            _add_chunk(b, row, n, samples, scores)
            prefilled.append((row, n))
            left -= n
        if row.decoding and row.scoring and row.prompt_end_logprobs is not None:
            done = _add_continuations(b, row, left, scores)
            if done:
                continued.append((row, done))
                left -= sum(
                    len(c) for c in row.request.continuations[row.next_continuation : row.next_continuation + done]
                )
    if not b.ids:
        return None
    batch = StepBatch(b.ids, b.positions, b.lanes, b.stores, b.decode_slots, b.chunks, b.logit_rows)
    return Step(batch, samples, scores, prefilled, continued)


def _add_tokens(b: _Builder, chunk: Chunk, ids: tuple[int, ...]) -> None:
    b.chunks.append(chunk)
    b.ids.extend(ids)
    b.positions.extend(range(chunk.pos, chunk.pos + chunk.length))
    b.stores.extend(range(chunk.store_at, chunk.store_at + chunk.length))
    b.lanes.extend([chunk.lane] * chunk.length)


def _add_chunk(b: _Builder, row: Row, n: int, samples: list[Sample], scores: list[Score]) -> None:
    start, pos = len(b.ids), row.prefilled
    _add_tokens(b, Chunk(start, n, row.lane, pos, row.slot), row.request.prompt_ids[pos : pos + n])
    if pos + n == row.prompt_len:
        if row.scoring:
            scores.append(Score(row, b.logit_row(start + n - 1), -1, -1))
        elif row.request.sampling.max_new_tokens > 0:
            samples.append(Sample(row, b.logit_row(start + n - 1)))


def _add_continuations(b: _Builder, row: Row, budget: int, scores: list[Score]) -> int:
    """As many of the row's remaining continuations as fit the budget, each stored after the previous ones
    (each sees only the prompt and itself). Returns how many were added."""
    conts = row.request.continuations
    added = 0
    while row.next_continuation + added < len(conts):
        i = row.next_continuation + added
        cont = conts[i]
        if len(cont) > budget:
            break
        start, store = len(b.ids), row.prompt_len + sum(len(c) for c in conts[:i])
        _add_tokens(b, Chunk(start, len(cont), row.lane, row.prompt_len, row.slot, store, row.prompt_len), cont)
        for j in range(1, len(cont)):  # logits at token j-1 score token j
            scores.append(Score(row, b.logit_row(start + j - 1), i, j))
        budget -= len(cont)
        added += 1
    return added
