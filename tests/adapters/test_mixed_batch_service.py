"""Through the service: 8 users with distinct PEFT adapters (ranks 2..16, different target modules) + 1
base-only user, sent concurrently, decode in the same engine steps; every row equals what PEFT's own
PeftModel.from_pretrained(base, that adapter) generates alone, and the logprobs match (1e-4)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from service.accounts import repository as accounts
from service.db.session import unit_of_work
from service.engine.base import Collected, collect
from service.engine.types import StepInfo
from service.generation.prepare import ChatTurn, GenerationSpec, Personalization
from service.generation.sampling import SamplingOptions
from service.tenancy import UserRef
from tests.conftest import app_state, bearer, builtin_engine, create_user, running_app
from tests.factories import ALL, greedy, lora_zip, make_lora, peft_model, upload
from tests.models import load_base, reference_text

NEW_TOKENS = 16
SPECS: list[tuple[int, tuple[str, ...]]] = [  # (rank, target modules) of users u0..u7
    (2, ALL),
    (4, ("q_proj", "v_proj")),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (16, ("gate_proj", "up_proj", "down_proj")),
    (2, ("v_proj", "o_proj", "down_proj")),
    (4, ALL),
    (8, ("q_proj", "v_proj", "up_proj")),
    (16, ("k_proj", "o_proj", "gate_proj")),
]
PROMPTS = [
    "Tell me about zebras.",
    "hi",
    "What is the capital of France?",
    "Write a haiku about the sea, please.",
    "2+2=?",
    "Recommend a movie for tonight.",
    "Explain LoRA in one sentence.",
    "Why is the sky blue?",
    "Say something nice.",  # the base-only user
]


@dataclass
class Setup:
    client: TestClient
    users: list[tuple[str, str]]  # (user_id, api key); the last one has no adapter
    adapter_dirs: list[Path]
    base: Any
    tokenizer: Any


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("mixed")
    base = load_base(tiny_model_path)
    dirs = [make_lora(base, tmp / f"lora{i}", seed=100 + i, r=r, targets=t) for i, (r, t) in enumerate(SPECS)]
    # A long window: the idle engine waits for all 9 concurrent requests before its first step.
    with running_app(
        tmp, tiny_model_path, batch_window_ms=3000.0, batch_max_size=len(PROMPTS), adapter_slots=len(SPECS)
    ) as client:
        users = []
        for i in range(len(PROMPTS)):
            user = f"u{i}"
            key = create_user(client, user)
            if i < len(dirs):
                r = upload(client, user, key, lora_zip(dirs[i]))
                assert r.status_code == 201 and r.json()["rank"] == SPECS[i][0], r.text
            users.append((user, key))
        yield Setup(client, users, dirs, base, AutoTokenizer.from_pretrained(tiny_model_path))


def test_concurrent_users_run_in_the_same_steps_and_match_peft(setup: Setup) -> None:
    client = setup.client
    steps: list[StepInfo] = []
    engine = builtin_engine(client)
    engine.on_step.append(steps.append)

    def send(i: int) -> dict[str, Any]:
        user, key = setup.users[i]
        r = client.post(f"/users/{user}/generate", json=greedy(PROMPTS[i], NEW_TOKENS), headers=bearer(key))
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(send, range(len(PROMPTS))))
    finally:
        engine.on_step.remove(steps.append)
    assert max(s.decode_rows for s in steps) == len(PROMPTS)  # 8 adapters + 1 base row decoding in one step

    for i, answer in enumerate(answers):
        is_base = i == len(SPECS)
        model = setup.base if is_base else peft_model(setup.base, setup.adapter_dirs[i])
        text, n_tokens = reference_text(model, setup.tokenizer, PROMPTS[i], NEW_TOKENS)
        assert answer["text"] == text, (i, answer["text"], text)
        assert answer["usage"]["completion_tokens"] == n_tokens
        assert answer["adapter_version"] == (None if is_base else 1)
    # The adapters visibly change the outputs (the comparison would be vacuous otherwise).
    for i in range(len(SPECS)):
        assert reference_text(setup.base, setup.tokenizer, PROMPTS[i], NEW_TOKENS)[0] != answers[i]["text"]
    assert len({a["text"] for a in answers}) == len(answers)


def test_mixed_rows_logprobs_match_peft(setup: Setup) -> None:
    """The same 9 requests prepared by the service's own preparation step, run together by its engine with
    logprobs: each chosen token's logprob equals PEFT's log-softmax within 1e-4."""
    state = app_state(setup.client)
    specs = []
    with unit_of_work(state.session_factory) as session:
        for (user, _key), text in zip(setup.users, PROMPTS, strict=True):
            ref = accounts.by_user_id(session, user)
            assert ref is not None
            target = UserRef(ref.id, ref.user_id, ref.storage_key)
            specs.append(
                GenerationSpec(
                    target,
                    (ChatTurn("user", text),),
                    Personalization(0, False, True),
                    SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.0),
                )
            )
    prepared = [state.preparer.prepare(spec) for spec in specs]
    requests = [replace(p.request, sampling=replace(p.request.sampling, logprobs=2)) for p in prepared]

    async def run_all() -> list[Collected]:
        return list(await asyncio.gather(*(collect(state.engine, r) for r in requests)))

    outs = asyncio.run(run_all())
    for i, (req, out) in enumerate(zip(requests, outs, strict=True)):
        model = setup.base if i == len(SPECS) else peft_model(setup.base, setup.adapter_dirs[i])
        ids = list(req.prompt_ids)
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids + out.token_ids])).logits[0].float(), dim=-1)
        for t, event in enumerate(out.tokens):
            assert event.logprob is not None
            assert abs(event.logprob - float(lp[len(ids) - 1 + t, event.token_id])) < 1e-4, (i, t)
            assert event.top[0].token_id == event.token_id
