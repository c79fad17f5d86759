"""Iteration-level scheduling: which rows run in the next step and how much of each.

Every step, each decoding row contributes one token; the rest of the step's token budget goes to prompt
chunks of rows still in prefill (so a long prompt is spread over steps instead of freezing the running
streams), shared fairly across tenants: each tenant with prompt work pending gets an equal share, a share it
does not use goes to the others (a lone tenant gets all of it), and within a tenant its rows are served
first-admitted first, at most one chunk per row. A scoring row, once its prompt is in, runs its continuations
(each whole, as many as fit its tenant's share) stored side by side after the prompt. The oldest row with
such work always gets its next piece (a continuation may exceed its tenant's share), so every row progresses.
Pure bookkeeping: no torch, no threads, no I/O.
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
    """Decode tokens of every decoding row, then prompt work shared across tenants, within `budget` tokens."""
    b = _Builder()
    samples: list[Sample] = []
    scores: list[Score] = []
    for row in sorted((r for r in running if r.decoding and r.output), key=lambda r: r.lane):
        samples.append(Sample(row, b.logit_row(len(b.ids))))
        b.ids.append(row.output[-1])
        b.positions.append(row.kv_len)
        b.stores.append(row.kv_len)
        b.lanes.append(row.lane)
        b.decode_slots.append(row.slot)
    work = _Work(b, samples, scores)
    _share_prompt_work(work, running, budget - len(b.ids))
    if not b.ids:
        return None
    batch = StepBatch(b.ids, b.positions, b.lanes, b.stores, b.decode_slots, b.chunks, b.logit_rows)
    return Step(batch, samples, scores, work.prefilled, work.continued)


@dataclass
class _Work:
    """The prompt side of a step being built."""

    b: _Builder
    samples: list[Sample]
    scores: list[Score]
    prefilled: list[tuple[Row, int]] = field(default_factory=list)
    continued: list[tuple[Row, int]] = field(default_factory=list)


def _pending(row: Row) -> int:
    """Prompt-side tokens the row has yet to run: the rest of its prompt, or (scoring, prompt in) of its
    continuations."""
    if not row.decoding:
        return row.prompt_len - row.prefilled
    if row.scoring and row.prompt_end_logprobs is not None:
        return sum(len(c) for c in row.request.continuations[row.next_continuation :])
    return 0


def _share_prompt_work(work: _Work, running: list[Row], left: int) -> None:
    """`left` tokens of prompt work, max-min fair across tenants: tenants in order of pending work, smallest
    first, each taking up to an equal share of what is still left, so what a small one leaves goes to the
    larger ones. The oldest row's tenant gets at least that row's next piece, kept aside until its turn."""
    tenants: dict[str, list[Row]] = {}  # in order of each tenant's oldest pending row
    for row in running:
        if _pending(row):
            tenants.setdefault(row.request.tenant, []).append(row)
    if not tenants or left <= 0:
        return
    oldest = next(iter(tenants.values()))[0]
    # a prompt progresses by any token; a continuation runs whole or not at all
    floor = 1 if not oldest.decoding else len(oldest.request.continuations[oldest.next_continuation])
    floor = floor if floor <= left else 0
    rest = left - floor
    order = sorted(tenants, key=lambda t: sum(map(_pending, tenants[t])))
    for i, tenant in enumerate(order):
        reserved = floor if tenant == oldest.request.tenant else 0
        share = max(-(-(rest + reserved) // (len(order) - i)), reserved)  # rounded up: odd tokens to the smaller
        rest += reserved - _serve(work, tenants[tenant], share)


def _serve(work: _Work, rows: list[Row], share: int) -> int:
    """A tenant's share to its rows, first-admitted first: a prompt chunk of each row in prefill, whole
    continuations of each scoring row. Returns the tokens used."""
    used = 0
    for row in rows:
        if used >= share:
            break
        if not row.decoding:
            n = min(row.prompt_len - row.prefilled, share - used)
            _add_chunk(work.b, row, n, work.samples, work.scores)
            work.prefilled.append((row, n))
            used += n
        elif done := _add_continuations(work.b, row, share - used, work.scores):
            work.continued.append((row, done))
            conts = row.request.continuations[row.next_continuation : row.next_continuation + done]
            used += sum(len(c) for c in conts)
    return used


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
