"""The builtin scheduler (`plan_step`): decode tokens first, then the prompt part of the step's budget shared
fairly across tenants (work-conserving, first-admitted first within a tenant, one chunk per row), scored
continuations whole (the same on the tiny model's engine: tests/engine/test_builtin.py)."""

from __future__ import annotations

import random
from collections import Counter

import torch

from service.engine.builtin.sampler import RowDecoder
from service.engine.builtin.scheduler import Row, Step, plan_step
from service.engine.types import EngineRequest, SamplingParams

BUDGET = 48  # tokens per step: small, so that long prompts are chunked across steps


def row(tenant: str, prompt_len: int, lane: int, *, continuations: tuple[int, ...] = (), new: int = 4) -> Row:
    conts = tuple((5,) * n for n in continuations)
    params = SamplingParams(0 if conts else new, stop_token_ids=frozenset({2}))
    req = EngineRequest(f"{tenant}{lane}", (7,) * prompt_len, params, None, tenant, 1e18, conts)
    return Row(req, lambda _: None, RowDecoder.for_params(params, torch.device("cpu")), lane=lane)


def decoding(tenant: str, lane: int) -> Row:
    """A row past its prompt, with one token out: it decodes one token a step."""
    r = row(tenant, 4, lane)
    r.prefilled = r.kv_len = 4
    r.output.append(9)
    return r


def scoring(tenant: str, lane: int, continuations: tuple[int, ...]) -> Row:
    """A scoring row whose prompt is in: its continuations are what it has left."""
    r = row(tenant, 4, lane, continuations=continuations)
    r.prefilled = r.kv_len = 4
    r.prompt_end_logprobs = torch.zeros(1)
    return r


def chunks(step: Step) -> dict[str, int]:
    """Prompt tokens each row (by request id) writes in the step."""
    return {r.request.request_id: n for r, n in step.prefilled}


def _tokens_per_tenant(step: Step) -> Counter[str]:
    got: Counter[str] = Counter()
    for r, n in step.prefilled:
        got[r.request.tenant] += n
    for r, n in step.continued:
        got[r.request.tenant] += sum(map(len, r.request.continuations[r.next_continuation : r.next_continuation + n]))
    return got


def plan(running: list[Row], budget: int = BUDGET) -> Step:
    step = plan_step(running, budget)
    assert step is not None
    assert len(step.batch.token_ids) <= budget
    assert len({id(r) for r, _ in step.prefilled}) == len(step.prefilled)  # one prompt chunk a row at most
    return step


def test_another_tenants_short_prompt_is_prefilled_at_once_beside_one_tenants_long_prompts() -> None:
    """The reviewer's scenario: user a's 8 x 240-token prompts, then user b's 5-token one: b's prompt goes in
    whole in the first step (its first token sampled), a takes the rest of the budget on its oldest row."""
    a = [row("a", 240, lane) for lane in range(8)]
    b = row("b", 5, 8)
    step = plan([*a, b])
    assert chunks(step) == {"a0": BUDGET - 5, "b8": 5}
    assert [s.row for s in step.samples] == [b]


def test_the_prompt_budget_is_split_equally_between_tenants_whatever_their_row_counts() -> None:
    a = [row("a", 240, lane) for lane in range(8)]
    b = [row("b", 240, lane) for lane in range(8, 10)]
    c = [row("c", 240, 10)]
    step = plan([*a, *b, *c], budget=3 + 48)
    assert chunks(step) == {"a0": 17, "b8": 17, "c10": 17}


def test_decode_tokens_come_first_and_the_rest_is_shared() -> None:
    running = [decoding("a", 0), decoding("b", 1), row("a", 240, 2), row("b", 240, 3), decoding("a", 4)]
    step = plan(running)
    assert step.batch.n_decode == 3
    assert chunks(step) == {"a2": 23, "b3": 22}
    assert len(step.batch.token_ids) == BUDGET


def test_a_share_a_tenant_cannot_use_goes_to_the_others() -> None:
    """b needs 3 tokens, c 20: a, with the longest prompts, takes what they leave: every token is used."""
    running = [row("a", 240, 0), row("a", 240, 1), row("b", 3, 2), row("c", 20, 3)]
    step = plan(running)
    assert chunks(step) == {"a0": BUDGET - 23, "b2": 3, "c3": 20}


def test_within_a_tenant_rows_are_served_first_admitted_first() -> None:
    running = [row("a", 240, 0), row("b", 10, 1), row("b", 30, 2), row("b", 240, 3)]
    step = plan(running)
    assert chunks(step) == {"a0": 24, "b1": 10, "b2": 14}


def test_a_lone_tenant_gets_the_whole_budget_first_admitted_first() -> None:
    """Work-conserving: alone, a tenant's prefill goes as fast as before (the step full, oldest rows first)."""
    step = plan([decoding("a", 0), *(row("a", 240, lane) for lane in range(1, 9))])
    assert chunks(step) == {"a1": BUDGET - 1}
    step = plan([row("a", 20, lane) for lane in range(5)])
    assert chunks(step) == {"a0": 20, "a1": 20, "a2": 8}


def test_scored_continuations_run_whole_within_their_tenants_share() -> None:
    """b's two 5-token continuations fit its share: both run beside a's prompt; a 30-token one does not fit
    a share of 24 (another tenant's row is older): a uses the whole budget meanwhile."""
    a = [row("a", 240, lane) for lane in range(4)]
    step = plan([*a, scoring("b", 4, (5, 5))])
    assert _tokens_per_tenant(step) == {"a": BUDGET - 10, "b": 10}
    assert [(r.request.request_id, n) for r, n in step.continued] == [("b4", 2)]
    step = plan([*a, scoring("b", 4, (30,))])
    assert _tokens_per_tenant(step) == {"a": BUDGET} and not step.continued


def test_the_oldest_rows_continuation_runs_whole_even_above_its_tenants_share() -> None:
    """Every row progresses: the oldest row with prompt work gets its next piece, a whole continuation
    longer than an equal share included; the others share what is left."""
    step = plan([scoring("s", 0, (40, 40)), row("a", 240, 1), row("b", 240, 2)])
    assert _tokens_per_tenant(step) == {"s": 40, "a": 4, "b": 4}


def test_every_step_is_full_and_max_min_fair_until_all_prompts_are_in() -> None:
    """Random prompts of 4 tenants, prefilled to the end: each step uses min(budget, pending) tokens (no
    prefill lost to the sharing), and a tenant gets less than another (by more than rounding) only when it
    got all it had pending."""
    rnd = random.Random(7)
    running = [row(f"t{rnd.randrange(4)}", rnd.randrange(1, 300), lane) for lane in range(16)]
    pending = sum(r.prompt_len for r in running)
    steps = 0
    while pending:
        step = plan(running)
        got = _tokens_per_tenant(step)
        assert got.total() == min(BUDGET, pending)
        demand = Counter[str]()
        for r in running:
            demand[r.request.tenant] += r.prompt_len - r.prefilled
        for x in demand:
            for y in demand:
                assert got[x] == demand[x] or got[x] >= got[y] - 1, (got, demand)
        for r, n in step.prefilled:
            r.prefilled += n
        pending -= got.total()
        steps += 1
    assert steps == -(-sum(r.prompt_len for r in running) // BUDGET)
