"""The builtin engine on a tiny random Llama: continuous batching against PEFT/transformers row by row, rows
joining and leaving mid-flight, chunked prefill under the step budget, per-row failure isolation, cancel."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from service.adapters.cache import AdapterCache
from service.adapters.peft_format import AdapterWeights, LoraModuleWeights, merge_lora, read_adapter_dir
from service.adapters.slots import LoraSlots, fits_slot
from service.data_rights import UserErased
from service.engine import base as engine_base
from service.engine.base import Started
from service.engine.builtin import engine as builtin_engine
from service.engine.builtin import executor, sampler
from service.engine.builtin.engine import SLOT_WAIT_STEPS, BuiltinEngine
from service.engine.builtin.executor import decode_groups
from service.engine.builtin.scheduler import Row
from service.engine.types import AdapterRef, EngineRequest, Finished, SamplingParams, StepInfo, TokenEvent
from service.errors import (
    AdapterUnavailable,
    GenerationFailed,
    PromptTooLong,
    TooManyRequests,
    Unavailable,
    Unprocessable,
)
from service.inference.loader import LoadedModel
from tests.factories import ALL, make_adapter, peft_model
from tests.models import tiny_model

EOS = 2
BUDGET = 48  # tokens per step: small, so that long prompts are chunked across steps
SPECS: list[tuple[int, tuple[str, ...], bool]] = [
    (2, ("q_proj", "v_proj"), False),
    (4, ("q_proj", "k_proj", "v_proj", "o_proj"), True),
    (8, ("gate_proj", "up_proj", "down_proj"), False),
    (16, ALL, False),
    (2, ("o_proj", "down_proj"), True),
    (8, ("q_proj", "v_proj", "gate_proj"), False),
]


def prompt(k: int, length: int | None = None) -> list[int]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randint(3, 512, (length or 3 + k,), generator=g).tolist()


@dataclass
class Setup:
    base: Any
    refs: list[AdapterRef]
    engine: BuiltinEngine
    steps: list[StepInfo] = field(default_factory=list)


def ref_of(directory: Path, name: str) -> AdapterRef:
    return AdapterRef(name, 1, name * 8, directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base, root = tiny_model(), tmp_path_factory.mktemp("engine")
    dirs = [
        make_adapter(base, root / f"a{k}", seed=10 + k, r=r, targets=t, rslora=rs) for k, (r, t, rs) in enumerate(SPECS)
    ]
    engine = make_engine(base, slots=8, rows=16)
    s = Setup(base, [ref_of(d, f"a{k}") for k, d in enumerate(dirs)], engine)
    engine.on_step.append(s.steps.append)
    engine.start()
    yield s
    engine.stop()


def make_engine(
    base: Any, *, slots: int, rows: int, max_scale: float = 256.0, queue_per_tenant: int = 64, packed: bool = False
) -> BuiltinEngine:
    model = copy.deepcopy(base)
    lora = LoraSlots(model, slots, 16, ALL, device="cpu", dtype=torch.float32)
    cache = AdapterCache(lora, host_budget_bytes=64 << 20, max_scale=max_scale)
    loaded = LoadedModel(model, None, torch.device("cpu"), torch.float32, "tiny", None)
    return BuiltinEngine(
        loaded,
        cache,
        lora,
        max_rows=rows,
        max_model_len=256,
        max_batch_tokens=BUDGET,
        window_s=0.0,
        queue_max=256,
        queue_per_tenant=queue_per_tenant,
        max_scale=max_scale,
        packed_weights=packed,
    )


def request(
    ids: list[int],
    new: int,
    adapter: AdapterRef | None = None,
    tenant: str = "t",
    continuations: tuple[tuple[int, ...], ...] = (),
    **sampling: Any,
) -> EngineRequest:
    params = SamplingParams(new, stop_token_ids=frozenset({EOS}), **sampling)
    return EngineRequest(f"r{id(ids)}", tuple(ids), params, adapter, tenant, time.monotonic() + 120, continuations)


@dataclass
class Outcome:
    tokens: list[TokenEvent]
    finished: Finished | None
    error: BaseException | None
    submitted_step: int = 0

    @property
    def ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]


async def consume(engine: BuiltinEngine, req: EngineRequest, on_token: Callable[[int], None] | None = None) -> Outcome:
    out = Outcome([], None, None, engine._steps)
    try:
        async for event in engine.stream(req):
            if isinstance(event, Finished):
                out.finished = event
            else:
                out.tokens.append(event)
                if on_token is not None:
                    on_token(len(out.tokens))
    except Exception as exc:
        out.error = exc
    return out


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def reference(model: Any, ids: list[int], new: int) -> tuple[list[int], bool]:
    """(tokens without the eos, stopped on eos) from transformers' own greedy generate."""
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new, eos_token_id=EOS, pad_token_id=EOS)
    toks: list[int] = out[0, len(ids) :].tolist()
    stopped = bool(toks) and toks[-1] == EOS
    return (toks[:-1] if stopped else toks), stopped


def check_against(model: Any, ids: list[int], new: int, got: Outcome) -> None:
    toks, stopped = reference(model, ids, new)
    assert got.error is None, got.error
    assert got.ids == toks
    assert got.finished is not None and got.finished.reason == ("stop" if stopped else "length")
    with torch.inference_mode():  # logprob of each chosen token = log_softmax of PEFT's logits
        full = torch.log_softmax(model(input_ids=torch.tensor([ids + got.ids])).logits[0].float(), dim=-1)
    for t, event in enumerate(got.tokens):
        assert event.logprob is not None
        assert abs(event.logprob - float(full[len(ids) - 1 + t, event.token_id])) < 1e-4, f"step {t}"
        assert event.top[0].token_id == event.token_id  # greedy: the top token is the chosen one


def _mixed_rows_equal_peft(s: Setup, engine: BuiltinEngine) -> None:
    rows = [(prompt(k, 3 + 7 * k), 4 + 3 * k, s.refs[k % 6] if k % 7 else None) for k in range(14)]
    _rows_equal_peft(s, engine, rows)


def _rows_equal_peft(s: Setup, engine: BuiltinEngine, rows: list[tuple[list[int], int, AdapterRef | None]]) -> None:
    async def main() -> list[Outcome]:
        tasks = []
        for k, (ids, new, ref) in enumerate(rows):
            req = request(ids, new, ref, tenant=f"u{k % 5}", logprobs=1)
            tasks.append(asyncio.ensure_future(consume(engine, req)))
            await asyncio.sleep(0.002 * (k % 4))  # arrivals spread over the running steps
        return list(await asyncio.gather(*tasks))

    outs = run(main())
    for (ids, new, ref), got in zip(rows, outs, strict=True):
        check_against(s.base if ref is None else peft_model(s.base, ref.directory), ids, new, got)
    assert engine.stats().running == 0 and engine.stats().slots_pinned == 0


def test_mixed_rows_joining_and_leaving_equal_peft_row_by_row(setup: Setup) -> None:
    """Rows of 6 adapters and the base, prompts of 3..90 tokens (the long ones chunked over steps), arriving
    while others run and leaving at different lengths: each row's tokens and logprobs are its solo ones."""
    _mixed_rows_equal_peft(setup, setup.engine)
    assert any(s.decode_rows and s.prefill_tokens for s in setup.steps), "prefill was never interleaved with decode"
    assert max(s.tokens for s in setup.steps) <= BUDGET


def test_decode_rows_of_very_different_lengths_equal_peft_row_by_row(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contexts of 4..240 tokens decoding side by side, joining and leaving, mixed adapters: the decode rows are
    attended in several calls (one per group of similar length) and each row's tokens are still its solo ones."""
    monkeypatch.setattr(executor, "DECODE_CALL_COST", 8)  # contexts this short would otherwise share one call
    monkeypatch.setattr(executor, "DECODE_LANE_COST", 0)
    groups: list[int] = []

    def spy(lanes: list[int], lengths: list[int]) -> list[list[int]]:
        out = decode_groups(lanes, lengths)
        groups.append(len(out))
        return out

    monkeypatch.setattr(executor, "decode_groups", spy)
    lengths = [(200, 30), (3, 40), (150, 20), (6, 36), (230, 8), (12, 28), (90, 24), (4, 12), (170, 40), (25, 16)]
    rows = [(prompt(k, n), new, setup.refs[k % 6] if k % 4 else None) for k, (n, new) in enumerate(lengths)]
    _rows_equal_peft(setup, setup.engine, rows)
    assert max(groups) > 1, "the decode rows were never split"


def test_decode_groups_split_a_long_row_off_and_keep_similar_rows_together() -> None:
    assert decode_groups([0, 1, 2, 3], [120, 130, 125, 128]) == [[0, 1, 2, 3]]
    assert decode_groups([0, 1, 2, 3], [120, 1900, 125, 128]) == [[0, 2, 3], [1]]
    # the long rows' lane range would pad the lane between them at 2000 keys: each gets a call of its own
    assert decode_groups([0, 1, 2, 3], [64, 2000, 64, 2000]) == [[0, 2], [1], [3]]
    assert decode_groups([], []) == []


def test_on_packed_weights_mixed_rows_equal_peft_row_by_row(setup: Setup) -> None:
    """The same on Linears packed for oneDNN (engine/builtin/packed.py) in fp32: the eager path's greedy
    tokens, and its logprobs within 1e-4 (the packed kernel sums in another order)."""
    engine = make_engine(setup.base, slots=8, rows=16, packed=True)
    assert engine.packed is not None and len(engine.packed) > 0
    engine.start()
    try:
        _mixed_rows_equal_peft(setup, engine)
    finally:
        engine.stop()


def test_on_packed_weights_the_merged_shared_lora_is_served(setup: Setup) -> None:
    """The shared LoRA's merge changes the weights in place: the packed copies follow it (and its unmerge)."""
    engine = make_engine(setup.base, slots=2, rows=2, packed=True)
    merged = copy.deepcopy(setup.base)
    merge_lora(merged, read_adapter_dir(setup.refs[3].directory, max_scale=256.0))
    ids = prompt(3, 12)
    shared = replace(setup.refs[3], version=1)
    engine.start()
    try:
        got = run(consume(engine, replace(request(ids, 8), shared=shared)))  # the row asks for the shared LoRA
        assert engine.applied_shared[0] == 1
        assert got.ids == reference(merged, ids, 8)[0]
        assert got.ids != reference(setup.base, ids, 8)[0]  # the merge changes this row's tokens
        assert run(consume(engine, request(ids, 8))).ids == reference(setup.base, ids, 8)[0]  # none: unmerged
        assert engine.applied_shared == (None, {})
    finally:
        engine.stop()


def test_a_request_read_before_a_new_shared_version_never_switches_the_engine_back(setup: Setup) -> None:
    """A request prepared (its shared version read) before a new version's notice reached its row after the
    notice: it set the engine back to the old version, so the rows that named the new one ran on the old one
    (and their answers reported the new one). The newest read wins; the stale row is refused (503, retry)."""
    engine = make_engine(setup.base, slots=2, rows=2)
    merged = copy.deepcopy(setup.base)
    merge_lora(merged, read_adapter_dir(setup.refs[3].directory, max_scale=256.0))
    ids = prompt(3, 12)
    old, new = None, replace(setup.refs[3], version=2)
    engine.start()
    try:
        engine.use_shared(new, read_at=20.0)  # the notice: v2, read at t=20
        stale = replace(request(ids, 8), shared=old, shared_read_at=15.0)  # prepared at t=15, before it
        got = run(consume(engine, stale))
        assert isinstance(got.error, AdapterUnavailable), got
        assert engine.shared_version == 2 and engine.applied_shared[0] == 2
        fresh = replace(request(ids, 8), shared=new, shared_read_at=25.0)
        got = run(consume(engine, fresh))
        assert got.error is None and got.ids == reference(merged, ids, 8)[0]  # on v2, as it names
        engine.use_shared(old, read_at=30.0)  # a newer read (v2 retired): it moves, as it must
        got = run(consume(engine, replace(request(ids, 8), shared=old, shared_read_at=31.0)))
        assert got.error is None and got.ids == reference(setup.base, ids, 8)[0]
        assert engine.applied_shared == (None, {})
    finally:
        engine.stop()


def test_a_use_shared_call_returns_only_once_its_version_is_the_target(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests naming the new version at once: the older read returned at once (the newer one was still
    reading the weights, the target unset), its row was queued and refused at its start (503) for a version
    about to be the current one. A call returns once its version, or a newer read's, is the target."""
    engine = make_engine(setup.base, slots=2, rows=2)
    reading, go = threading.Event(), threading.Event()
    real_read = read_adapter_dir

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        go.wait(10)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(builtin_engine, "read_adapter_dir", slow_read)
    v1 = replace(setup.refs[3], version=1)
    newer = threading.Thread(target=engine.use_shared, args=(v1, 11.0))
    newer.start()
    assert reading.wait(10)
    older = threading.Thread(target=engine.use_shared, args=(v1, 10.0))
    older.start()
    older.join(0.3)
    assert older.is_alive()  # it waits for the newer call, not returning with no target set
    go.set()
    older.join(10)
    newer.join(10)
    assert engine.shared_version == 1


def test_the_engine_and_request_threads_give_back_their_openmp_pools(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle thread's OpenMP pool stops libgomp spin-waiting in every pool (service/inference/threads.py):
    the engine thread gives its pool back once each time it goes idle (not at every idle wait), and the
    request thread that prepared a row (adapter reads) gives back its own."""
    calls: list[str] = []
    monkeypatch.setattr(engine_base, "release_pool", lambda: calls.append(threading.current_thread().name))
    monkeypatch.setattr(builtin_engine, "release_pool", lambda: calls.append(threading.current_thread().name))
    engine_thread = "oppu-BuiltinEngine"
    for k in range(2):
        got = run(consume(setup.engine, request(prompt(k, 9), 6, setup.refs[k])))
        assert got.error is None and len(got.ids) > 0
        deadline = time.monotonic() + 10
        while calls.count(engine_thread) < k + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(5 * setup.engine.idle_wait_s)  # idle: several idle waits, no further release
        assert calls.count(engine_thread) == k + 1, calls
    assert len([c for c in calls if c != engine_thread]) == 2, calls  # one per prepared row


def test_the_shared_version_never_reads_as_the_old_one_while_the_new_one_is_merged(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the engine thread taking a pending shared LoRA and the end of its merge, `shared_version` answers
    with the new version (a request that has just published it reads it back), never with the one replaced."""
    engine = make_engine(setup.base, slots=2, rows=2)
    merging, done = threading.Event(), threading.Event()
    real_merge = merge_lora

    def slow_merge(model: Any, weights: AdapterWeights) -> dict[str, torch.Tensor]:
        merging.set()
        done.wait(10)
        return real_merge(model, weights)

    monkeypatch.setattr(builtin_engine, "merge_lora", slow_merge)
    engine.start()
    try:
        engine.use_shared(replace(setup.refs[0], version=7))
        assert merging.wait(10), "the engine thread never merged"
        seen: list[int | None] = []
        reader = threading.Thread(target=lambda: seen.append(engine.shared_version))
        reader.start()
        reader.join(0.2)  # mid-merge
        done.set()
        reader.join(10)
        assert seen == [7]
        assert engine.applied_shared[0] == 7
    finally:
        done.set()
        engine.stop()


def test_every_adapter_changes_its_row(setup: Setup) -> None:
    ids = prompt(1, 9)
    base = run(consume(setup.engine, request(ids, 8))).ids
    assert all(run(consume(setup.engine, request(ids, 8, ref))).ids != base for ref in setup.refs)


def test_a_short_request_overtakes_a_long_batch_and_starts_within_one_step(setup: Setup) -> None:
    """Submitted while 8 long rows decode, a short one (prompt within the step budget) produces its first
    token in the step after its submission at the latest, and ends before any long row."""
    engine = setup.engine
    ended: list[str] = []
    short_row: list[Row] = []

    async def main() -> Outcome:
        longs = [consume(engine, request(prompt(k, 20), 120, setup.refs[k % 6], ignore_eos=True)) for k in range(8)]
        tasks = [asyncio.ensure_future(c) for c in longs]
        for t in tasks:
            t.add_done_callback(lambda _: ended.append("long"))
        while len(engine._running) < 8 or not all(r.decoding for r in engine._running):  # noqa: ASYNC110 - polls the engine thread
            await asyncio.sleep(0.002)
        loop, events = asyncio.get_running_loop(), asyncio.Queue[object]()
        req = request(prompt(9, 6), 3, ignore_eos=True)

        def sink(item: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        row = engine._new_row(req, sink)
        short_row.append(row)
        engine.submit(row)
        got = Outcome([], None, None, row.submitted_step)
        while got.finished is None:
            item = await events.get()
            if isinstance(item, Finished):
                got.finished = item
            elif isinstance(item, TokenEvent):
                got.tokens.append(item)
        ended.append("short")
        await asyncio.gather(*tasks)
        return got

    short = run(main())
    (row,) = short_row
    assert ended[0] == "short", ended
    assert short.finished is not None and len(short.ids) == 3
    assert row.first_step is not None and row.first_step - row.submitted_step <= 1
    assert max(s.tokens for s in setup.steps) <= BUDGET


def test_a_poisoned_adapter_fails_its_row_alone(setup: Setup) -> None:
    """The H1 report: an adapter with lora_alpha 1e300 (as an older validator let through) reaches the slot
    tier. Its scaled B overflows the slot dtype, so the slot refuses it at load (503 adapter_unavailable for
    that row; before that check it sat in a slot with an infinite scale, its logits NaN, and ended with
    generation_failed); 15 other rows in the same steps complete with their solo tokens."""
    good = [(prompt(k, 5 + k), 10, setup.refs[k % 6] if k % 3 else None) for k in range(15)]
    solo = [run(consume(setup.engine, request(ids, new, ref))).ids for ids, new, ref in good]
    src = setup.refs[0]
    bad = AdapterRef("poison", 1, "p" * 64, src.directory)
    weights = read_adapter_dir(src.directory, max_scale=256.0)
    poisoned = AdapterWeights(weights.rank, {p: replace(m, scaling=1e300) for p, m in weights.modules.items()})
    setup.engine.cache._admit_host(bad, poisoned)  # already in the host tier: no load-time check runs

    async def main() -> list[Outcome]:
        reqs = [request(ids, new, ref, tenant=f"g{k}") for k, (ids, new, ref) in enumerate(good)]
        reqs.insert(7, request(prompt(1, 8), 10, bad, tenant="attacker", temperature=1.0, seed=1))
        return list(await asyncio.gather(*(consume(setup.engine, r) for r in reqs)))

    outs = run(main())
    failed = outs.pop(7)
    assert isinstance(failed.error, AdapterUnavailable) and failed.error.status == 503, failed
    assert [o.ids for o in outs] == solo and all(o.error is None for o in outs)
    assert setup.engine.stats().running == 0 and setup.engine.stats().slots_pinned == 0
    setup.engine.drop_owner("poison")


def overflowing_adapter(base: Any) -> tuple[AdapterWeights, int, list[int]]:
    """A rank-1 adapter on layer 0's v_proj that an upload accepts (finite, fits a float32 slot) whose B of ~1e38
    overflows the values of one token to inf: (its weights, that token, tokens it leaves finite)."""
    path, layer = "model.layers.0.self_attn.v_proj", base.model.layers[0]
    u = torch.randn(base.config.hidden_size, generator=torch.Generator().manual_seed(5))
    u /= u.norm()
    with torch.inference_mode():  # layer 0's v_proj input depends on the token alone
        ids = torch.arange(3, 512)
        proj = layer.input_layernorm(base.model.embed_tokens(ids)) @ u
    order = proj.abs().argsort()
    b = torch.full((layer.self_attn.v_proj.out_features, 1), 3.4e38 / (0.9 * float(proj.abs().max())))
    weights = AdapterWeights(1, {path: LoraModuleWeights(u[None, :].clone(), b, 1.0)})
    assert fits_slot(weights.modules[path], torch.float32)
    return weights, int(ids[order[-1]]), [int(ids[i]) for i in order[: len(order) // 2]]


def decode_beside(engine: BuiltinEngine, short: EngineRequest) -> Outcome:
    """`short` on the lowest free lane, decoding in one attention call beside a longer row on the next lane (so
    it reads its own lane up to the longer row's length, its positions past its own masked out)."""
    both = threading.Event()
    admit = engine._admit

    async def main() -> Outcome:
        first = asyncio.ensure_future(consume(engine, short))
        while not len(engine._waiting):  # noqa: ASYNC110 - polls the engine thread
            await asyncio.sleep(0.002)
        longer = asyncio.ensure_future(consume(engine, request(prompt(2, 40), 12, tenant="other", ignore_eos=True)))
        while len(engine._waiting) < 2:  # noqa: ASYNC110 - polls the engine thread
            await asyncio.sleep(0.002)
        both.set()
        assert (await longer).error is None
        return await first

    with pytest.MonkeyPatch.context() as m:
        m.setattr(executor, "DECODE_CALL_COST", 1 << 20)  # one call for every decode row
        m.setattr(engine, "_admit", lambda: (both.wait(10), admit()))  # both rows queued, in this order
        return cast(Outcome, run(main()))


def test_a_scoring_row_with_an_overflowing_continuation_leaves_no_nan_for_the_next_row_on_its_lane(
    setup: Setup,
) -> None:
    """The reviewed finding: an uploaded adapter overflows one token's values to inf. Scored as a continuation,
    its non-finite logits end the row before its continuation was counted in its length, so its lane was zeroed
    over the prompt only; the next row on that lane, decoding beside a longer row, read the NaN through its
    masked positions and failed (generation_failed), and so did every later one."""
    engine = make_engine(setup.base, slots=2, rows=2)
    weights, bad, safe = overflowing_adapter(setup.base)
    attacker = AdapterRef("attacker", 1, "a" * 64, Path("/nonexistent"))
    engine.cache._admit_host(attacker, weights)  # as if uploaded: it passed the upload's checks
    engine.start()
    try:
        victim = request(prompt(1, 3), 12, tenant="victim", ignore_eos=True)
        solo = run(consume(engine, victim))
        assert solo.error is None and len(solo.ids) == 12
        score = request(safe[:10], 0, attacker, tenant="attacker", continuations=((bad, safe[0]),))
        scored = run(consume(engine, score))
        assert isinstance(scored.error, GenerationFailed), scored  # the overflow happened, on lane 0
        for _ in range(2):  # nor does the victim's own release leave any
            after = decode_beside(engine, victim)
            assert after.error is None and after.ids == solo.ids
        stats = engine.stats()
        assert stats.running == 0 and stats.slots_pinned == 0 and stats.extra["kv_lanes_free"] == 2
    finally:
        engine.stop()


def test_a_step_whose_forward_raised_leaves_its_lanes_zero(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that raised after writing K/V (here NaN) at its rows' positions: those rows end having counted
    none of it, below what an earlier, longer row had cleaned; the lane is still zero for the next row."""
    engine = make_engine(setup.base, slots=2, rows=2)
    engine.start()
    try:
        victim = request(prompt(1, 3), 12, tenant="victim", ignore_eos=True)
        solo = run(consume(engine, victim))
        assert run(consume(engine, request(prompt(3, 40), 2))).error is None  # lane 0 clean to 42
        real = engine._executor.forward

        def fails(batch: executor.StepBatch) -> torch.Tensor:
            lanes, stores = torch.tensor(batch.lanes), torch.tensor(batch.stores)
            for k, v in zip(engine.kv.k, engine.kv.v, strict=True):
                k[lanes, :, stores] = v[lanes, :, stores] = float("nan")
            raise RuntimeError("the accelerator failed mid-step")

        monkeypatch.setattr(engine._executor, "forward", fails)
        assert isinstance(run(consume(engine, request(prompt(4, 12), 4))).error, GenerationFailed)
        monkeypatch.setattr(engine._executor, "forward", real)
        after = decode_beside(engine, victim)
        assert after.error is None and after.ids == solo.ids
    finally:
        engine.stop()


def test_a_sampling_error_fails_its_row_alone(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sampler.RowDecoder.process

    def process(self: sampler.RowDecoder, logits: torch.Tensor) -> torch.Tensor:
        if self.params.seed == 666:
            raise RuntimeError("boom")
        return real(self, logits)

    monkeypatch.setattr(sampler.RowDecoder, "process", process)
    good = [(prompt(k, 6), 6) for k in range(5)]
    solo = [run(consume(setup.engine, request(ids, new))).ids for ids, new in good]

    async def main() -> list[Outcome]:
        reqs = [request(ids, new) for ids, new in good] + [request(prompt(9), 6, temperature=0.5, seed=666)]
        return list(await asyncio.gather(*(consume(setup.engine, r) for r in reqs)))

    *ok, broken = run(main())
    assert isinstance(broken.error, GenerationFailed) and broken.error.status == 503
    assert [o.ids for o in ok] == solo


def test_an_unreadable_adapter_fails_only_its_rows(setup: Setup, tmp_path: Path) -> None:
    gone = ref_of(tmp_path / "missing", "gone")

    async def main() -> list[Outcome]:
        reqs = [request(prompt(1), 4, setup.refs[1]), request(prompt(2), 4, gone), request(prompt(3), 4)]
        return list(await asyncio.gather(*(consume(setup.engine, r) for r in reqs)))

    ok1, broken, ok2 = run(main())
    assert isinstance(broken.error, AdapterUnavailable)
    assert ok1.error is None and ok2.error is None and ok1.ids and ok2.ids
    assert setup.engine.stats().slots_pinned == 0


def test_an_unreadable_shared_adapter_is_503_for_its_request_not_a_crash(setup: Setup, tmp_path: Path) -> None:
    gone = ref_of(tmp_path / "missing", "shared")
    broken = run(consume(setup.engine, replace(request(prompt(1), 4), shared=gone)))
    assert isinstance(broken.error, AdapterUnavailable) and broken.error.status == 503
    ok = run(consume(setup.engine, request(prompt(2), 4)))
    assert ok.error is None and ok.ids


def test_cancel_frees_the_row_its_kv_and_its_slot(setup: Setup) -> None:
    engine = setup.engine
    rows: list[Row] = []

    async def main() -> None:
        stream = engine.stream(request(prompt(4, 30), 200, setup.refs[2], ignore_eos=True))
        n = 0
        async for _ in stream:
            n += 1
            if n == 1:
                rows.extend(engine._running)
            if n == 5:
                break
        await stream.aclose()  # the client went away

    run(main())
    deadline = time.monotonic() + 5
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = engine.stats()
    assert stats.running == 0 and stats.slots_pinned == 0 and stats.extra["kv_lanes_free"] == stats.extra["kv_lanes"]
    (row,) = rows
    assert row.kv_len >= 30 + 4
    for k, v in zip(engine.kv.k, engine.kv.v, strict=True):  # zeroed where it wrote: nothing leaks to the next row
        assert float(k[row.lane, :, : row.kv_len].abs().sum() + v[row.lane, :, : row.kv_len].abs().sum()) == 0.0


def test_an_erased_users_row_the_engine_is_starting_meanwhile_is_cancelled(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewed finding: cancel_tenant looked at the queue and the running rows only, so a row the engine
    thread held between them (here: in _start, its adapter being read from disk) was missed and ran to its end
    for a user already erased. It ends with the cancel error, holding nothing; a row queued after the cancel
    runs, and the cancel is forgotten once no older row of the user is left."""
    engine = make_engine(setup.base, slots=2, rows=2)
    reading, go = threading.Event(), threading.Event()
    acquire = engine.cache.acquire

    def slow_acquire(keys: Any) -> list[int]:
        if threading.current_thread() is engine._thread:  # a slow disk, a large sealed adapter
            reading.set()
            go.wait(10)
        return acquire(keys)

    monkeypatch.setattr(engine.cache, "acquire", slow_acquire)
    erased = UserErased("the user was erased")
    engine.start()
    try:

        async def main() -> tuple[Outcome, int]:
            row = asyncio.ensure_future(consume(engine, request(prompt(1, 6), 8, setup.refs[1], tenant="gone")))
            while not reading.is_set():  # noqa: ASYNC110 - polls the engine thread
                await asyncio.sleep(0.002)
            seen = engine.cancel_tenant("gone", erased)
            go.set()
            return await row, seen

        out, seen = run(main())
        assert seen == 0  # in neither the queue nor the running rows: the window of the finding
        assert out.error is erased and out.ids == [] and out.finished is None, out
        stats = engine.stats()
        assert stats.running == 0 and stats.slots_pinned == 0 and stats.extra["kv_lanes_free"] == 2
        later = run(consume(engine, request(prompt(2, 6), 4, setup.refs[1], tenant="gone")))
        assert later.error is None and len(later.ids) == 4
        deadline = time.monotonic() + 5
        while engine._tenant_cancels:
            assert time.monotonic() < deadline, "the cancel is kept with no row it could apply to"
            time.sleep(0.01)
    finally:
        go.set()
        engine.stop()


def test_sampling_is_seeded_per_row_and_stops_are_not_emitted(setup: Setup) -> None:
    sampled = request(prompt(4), 16, setup.refs[3], temperature=1.0, top_p=0.9, seed=7)
    alone = run(consume(setup.engine, sampled)).ids

    async def crowd() -> list[Outcome]:
        others = [request(prompt(9), 8), request(prompt(2), 16, setup.refs[1], temperature=0.7, seed=1)]
        return list(await asyncio.gather(*(consume(setup.engine, r) for r in [*others, sampled])))

    assert run(crowd())[2].ids == alone
    assert run(consume(setup.engine, replace(sampled, sampling=replace(sampled.sampling, seed=8)))).ids != alone
    free = run(consume(setup.engine, request(prompt(1), 12))).ids
    stop_at = free[3]
    assert stop_at not in free[:3]
    params = SamplingParams(12, stop_token_ids=frozenset({stop_at}))
    stopped = run(consume(setup.engine, EngineRequest("s", tuple(prompt(1)), params, None, "t", time.monotonic() + 60)))
    assert stopped.ids == free[:3] and stopped.finished is not None and stopped.finished.reason == "stop"


def test_tenant_share(setup: Setup) -> None:
    engine = make_engine(setup.base, slots=2, rows=2, queue_per_tenant=1)
    engine.start()
    try:

        async def main() -> tuple[Outcome, Outcome]:
            hold = [
                asyncio.ensure_future(consume(engine, request(prompt(k), 100, ignore_eos=True, tenant=f"h{k}")))
                for k in range(2)
            ]
            while len(engine._running) < 2:  # noqa: ASYNC110 - polls the engine thread
                await asyncio.sleep(0.002)
            first = asyncio.ensure_future(consume(engine, request(prompt(5), 2, tenant="busy")))
            await asyncio.sleep(0.01)
            second = await consume(engine, request(prompt(6), 2, tenant="busy"))  # its share (1) is queued already
            for h in hold:
                h.cancel()
            return await first, second

        rejected: list[str] = []
        engine.on_reject.append(rejected.append)  # what /metrics counts (oppu_rejected_requests_total{reason})
        first, second = run(main())
        assert isinstance(second.error, TooManyRequests)
        assert first.error is None
        assert rejected == ["per_user"]
        with pytest.raises(Unavailable):
            engine.check_room("someone-else", 10**6)  # more rows than the whole queue holds
        assert rejected == ["per_user", "queue_full"]
    finally:
        engine.stop()


def _admission_order(engine: BuiltinEngine) -> list[str]:
    """Records the request id of every row that starts running, in order."""
    order: list[str] = []
    start = engine._start

    def recording(row: Row) -> Started:
        verdict = start(row)
        if verdict == "started":
            order.append(row.request.request_id)
        return verdict

    engine._start = recording  # type: ignore[method-assign]
    return order


@pytest.mark.parametrize("fair_share", [True, False])
def test_fair_share_one_user_with_3x_the_rows_delays_another_by_at_most_one_turn(
    setup: Setup, fair_share: bool
) -> None:
    """4 rows; user A runs 4 and has 8 more queued; user B sends 2. With fair share B's rows take the next two
    free rows (A is above its share of 4 / 2 users); plain round-robin lets an A row go between them."""
    engine = make_engine(setup.base, slots=2, rows=4)
    engine.fair_share = fair_share
    order = _admission_order(engine)
    engine.start()
    try:

        async def main() -> list[Outcome]:
            def a_row(i: int) -> EngineRequest:  # staggered lengths: rows end one at a time
                # the first ends after 32 steps: B's two rows (prepared in worker threads) are queued by then
                req = request(prompt(i, 4), 32 + 6 * i, ignore_eos=True, tenant="A")
                return replace(req, request_id=f"A{i}")

            a = [asyncio.ensure_future(consume(engine, a_row(i))) for i in range(12)]
            while len(order) < 4:  # noqa: ASYNC110 - polls the engine thread
                await asyncio.sleep(0.002)
            b = [
                asyncio.ensure_future(
                    consume(engine, replace(request(prompt(20 + i, 4), 4, tenant="B"), request_id=f"B{i}"))
                )
                for i in range(2)
            ]
            return await asyncio.gather(*a, *b)

        outcomes = run(main())
        assert all(o.error is None for o in outcomes)
    finally:
        engine.stop()
    # Rows reach the queue in the order their stream() calls finish preparing them (a worker thread each):
    # which A rows run first, and whether B0 or B1 comes first, is not the engine's choice.
    assert [r[0] for r in order[:4]] == ["A"] * 4, order
    if fair_share:
        assert sorted(order[4:6]) == ["B0", "B1"], order
    else:  # the test can tell: without the share rule an A row runs between B's two
        assert sorted(order[4:6]) != ["B0", "B1"], order


def test_fair_share_a_lone_user_gets_every_row(setup: Setup) -> None:
    engine = make_engine(setup.base, slots=2, rows=4)
    engine.start()
    try:

        async def main() -> int:
            rows = [
                asyncio.ensure_future(consume(engine, request(prompt(i, 4), 40, ignore_eos=True, tenant="A")))
                for i in range(4)
            ]
            most = 0
            while not all(r.done() for r in rows):
                most = max(most, len(engine._running))
                await asyncio.sleep(0.001)
            return most

        assert run(main()) == 4
    finally:
        engine.stop()


def test_a_row_waiting_for_a_slot_is_not_starved_by_rows_of_resident_adapters(setup: Setup) -> None:
    """2 slots held by two users who keep sending rows, a third user's row waits for a slot: rows of the
    resident adapters may overtake it for SLOT_WAIT_STEPS steps, then the slots drain and it runs (within the
    longest running row's length more), long before the stream of the others ends."""
    engine = make_engine(setup.base, slots=2, rows=4)
    engine.start()
    hot, cold = setup.refs[0], setup.refs[1]
    longest = 11
    try:

        async def one(name: str, ref: AdapterRef, new: int) -> Outcome:
            out = await consume(engine, request(prompt(new), new, ref, tenant=name, ignore_eos=True))
            assert out.error is None, out.error
            return out

        async def worker(name: str, ref: AdapterRef, new: int) -> None:
            for _ in range(12):
                await one(name, ref, new)

        async def stream(name: str, ref: AdapterRef) -> None:
            # 3 workers back to back, rows of different lengths: a row of this adapter is always running
            await asyncio.gather(*(worker(name, ref, new) for new in (4, 7, longest)))

        async def main() -> tuple[int, int]:
            streams = [asyncio.ensure_future(stream("h1", hot)), asyncio.ensure_future(stream("h2", setup.refs[2]))]
            while engine.stats().slots_pinned < 2:  # noqa: ASYNC110 - polls the engine thread
                await asyncio.sleep(0.002)
            out = await one("cold", cold, 2)
            waited = engine._steps - out.submitted_step
            await asyncio.gather(*streams)
            return waited, engine._steps - out.submitted_step

        waited, streams_left = run(main())
    finally:
        engine.stop()
    assert waited <= SLOT_WAIT_STEPS + longest + 4, (waited, streams_left)
    assert streams_left > 2 * waited  # the others were far from done: it did not just wait for the end


@pytest.mark.parametrize("adapter", [None, 3])
def test_scoring_continuations_equal_a_direct_forward(setup: Setup, adapter: int | None) -> None:
    """Continuations after one shared prompt (prefilled once, each continuation seeing only the prompt and
    itself), some rows generating in the same steps: each token's logprob equals a direct forward (1e-4)."""
    ids = prompt(7, 40)
    conts = ((11, 12, 13), (14,), (15, 16), tuple(prompt(8, 20)))
    ref = setup.refs[adapter] if adapter is not None else None
    model = setup.base if ref is None else peft_model(setup.base, ref.directory)

    async def main() -> list[Outcome]:
        others = [request(prompt(k, 10), 12) for k in range(3)]
        reqs = [*others, request(ids, 0, ref, continuations=conts)]
        return list(await asyncio.gather(*(consume(setup.engine, r) for r in reqs)))

    *_, score = run(main())
    assert score.error is None and score.finished is not None and score.ids == []
    got = score.finished.continuation_logprobs
    assert [len(g) for g in got] == [len(c) for c in conts]
    for cont, values in zip(conts, got, strict=True):
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids + list(cont)])).logits[0].float(), dim=-1)
        want = [float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(cont)]
        assert all(abs(a - b) < 1e-4 for a, b in zip(values, want, strict=True)), (values, want)


def test_an_empty_prompt_is_refused_not_left_waiting(setup: Setup) -> None:
    """A prompt that tokenizes to nothing could never be scheduled: it waited for its deadline (504)."""
    out = run(consume(setup.engine, request([], 4)))
    assert isinstance(out.error, Unprocessable) and out.error.status == 422


def test_scoring_requests_that_cannot_fit_are_refused(setup: Setup) -> None:
    # the one engine-limit error of every engine (engine.base.check_fits): 422 prompt_too_long
    empty = run(consume(setup.engine, request(prompt(1), 0, continuations=((),))))
    assert isinstance(empty.error, PromptTooLong)
    too_long = tuple(range(3, 3 + BUDGET))
    out = run(consume(setup.engine, request(prompt(1), 0, continuations=(too_long,))))
    assert isinstance(out.error, PromptTooLong)


def test_a_token_its_row_cannot_record_fails_that_row_alone(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row's grammar refusing its token (or any fault while recording it) ended the whole step: rows whose
    prompt finished in it never got a first token and waited for their deadline (504)."""
    real = sampler.RowDecoder.observe

    def observe(self: sampler.RowDecoder, token: int) -> None:
        if self.params.seed == 777:
            raise ValueError("the grammar rejected token 0")
        real(self, token)

    monkeypatch.setattr(sampler.RowDecoder, "observe", observe)
    good = [(prompt(k, 6), 6) for k in range(5)]
    solo = [run(consume(setup.engine, request(ids, new))).ids for ids, new in good]

    async def main() -> list[Outcome]:
        reqs = [request(prompt(9), 6, temperature=0.5, seed=777)] + [request(ids, new) for ids, new in good]
        return list(await asyncio.gather(*(consume(setup.engine, r) for r in reqs)))

    broken, *ok = run(main())
    assert isinstance(broken.error, GenerationFailed) and broken.error.status == 503
    assert [o.ids for o in ok] == solo and all(o.error is None for o in ok)
    assert setup.engine.stats().running == 0 and setup.engine.stats().slots_pinned == 0


def test_an_engine_whose_steps_keep_failing_says_it_is_unhealthy_until_one_succeeds(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a dead thread made the engine unhealthy: with every forward failing (a dead accelerator), /readyz
    stayed 200 while every request got 503."""
    from service.engine import base

    engine = make_engine(setup.base, slots=2, rows=4)
    engine.start()
    try:
        real = engine._executor.forward
        monkeypatch.setattr(engine._executor, "forward", lambda batch: 1 / 0)
        for k in range(base.FAILED_STEPS_UNHEALTHY - 1):
            assert isinstance(run(consume(engine, request(prompt(k), 2))).error, GenerationFailed)
        assert engine.stats().healthy  # a few failures: still serving
        run(consume(engine, request(prompt(9), 2)))
        assert not engine.stats().healthy
        monkeypatch.setattr(base, "UNHEALTHY_FOR_S", 0.0)  # the breaker's pause is over: traffic may come back
        assert engine.stats().healthy
        monkeypatch.setattr(base, "UNHEALTHY_FOR_S", 30.0)
        monkeypatch.setattr(engine._executor, "forward", real)
        assert run(consume(engine, request(prompt(1), 2))).error is None  # one good step clears the count
        assert engine.stats().healthy and engine._failed_steps == 0
    finally:
        engine.stop()


# --- the prompt budget shared across tenants (engine/builtin/scheduler.py) ---


def test_on_the_engine_a_short_prompt_is_not_held_back_by_another_users_long_prompts() -> None:
    """16 rows, 48 tokens a step; user a's 8 x 240-token prompts are being prefilled (40 steps' worth) when
    user b's 5-token prompt arrives: b's first token comes within two steps, long before a's last."""
    engine = make_engine(tiny_model(), slots=2, rows=16)
    engine.start()
    try:

        async def main() -> tuple[list[Row], Row, list[Outcome]]:
            rows: list[Row] = []
            outs = [
                submit(engine, request(prompt(20 + i, 240), 4, tenant="a", ignore_eos=True), rows) for i in range(8)
            ]
            while engine._steps < 1:  # noqa: ASYNC110 - polls the engine thread
                await asyncio.sleep(0.001)
            outs.append(submit(engine, request(prompt(1, 5), 4, tenant="b", ignore_eos=True), rows))
            return rows[:8], rows[8], list(await asyncio.gather(*outs))

        a, b, outcomes = run(main())
    finally:
        engine.stop()
    assert all(o.error is None and o.finished is not None for o in outcomes)
    assert b.first_step is not None and b.first_step - b.submitted_step <= 2
    assert max(r.first_step or 0 for r in a) > b.first_step + 10  # a's prompts were still going in


def submit(engine: BuiltinEngine, req: EngineRequest, rows: list[Row]) -> asyncio.Future[Outcome]:
    """Queue a row directly (kept in `rows`, for its steps) and collect what its requester hears."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue[object]()

    def sink(item: object) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    r = engine._new_row(req, sink)
    rows.append(r)
    engine.submit(r)

    async def collect() -> Outcome:
        got = Outcome([], None, None, r.submitted_step)
        while got.finished is None and got.error is None:
            item = await events.get()
            if isinstance(item, Finished):
                got.finished = item
            elif isinstance(item, TokenEvent):
                got.tokens.append(item)
            elif isinstance(item, BaseException):
                got.error = item
        return got

    return asyncio.ensure_future(collect())
