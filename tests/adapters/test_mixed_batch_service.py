"""Acceptance 1 through the service: 8 users with distinct PEFT adapters (ranks 2..16, different target
modules) + 1 base-only user, sent concurrently, run as ONE mixed batch; every row equals what PEFT's
own PeftModel.from_pretrained(base, that adapter) generates alone, and the logits match (1e-4)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from service.adapters.cache import AdapterKey
from service.inference.engine import GenRow, SamplingParams
from service.inference.tokens import encode_prompt, stop_token_ids
from tests.adapters.test_adapter_api import (
    ALL,
    app_state,
    greedy,
    load_base,
    lora_zip,
    make_lora,
    peft_model,
    reference_text,
    storage_key,
    upload,
)
from tests.conftest import bearer, create_user, running_app

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
    # A long window and batch_max_size == number of requests: the batch closes when all 9 are queued.
    overrides = {"batch_window_ms": 3000.0, "batch_max_size": len(PROMPTS), "adapter_slots": len(SPECS)}
    with running_app(tmp, tiny_model_path, **overrides) as client:
        users = []
        for i in range(len(PROMPTS)):
            user = f"u{i}"
            key = create_user(client, user)
            if i < len(dirs):
                r = upload(client, user, key, lora_zip(dirs[i]))
                assert r.status_code == 201 and r.json()["rank"] == SPECS[i][0], r.text
            users.append((user, key))
        yield Setup(client, users, dirs, base, AutoTokenizer.from_pretrained(tiny_model_path))


def test_concurrent_users_run_as_one_batch_and_match_peft(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    client = setup.client
    scheduler = app_state(client).runtime.scheduler  # type: ignore[union-attr]
    sizes: list[int] = []
    original = scheduler._on_batch

    def record(rows: int, *rest: Any) -> None:  # wraps the app's own hook (metrics), whatever it records
        sizes.append(rows)
        if original is not None:
            original(rows, *rest)

    monkeypatch.setattr(scheduler, "_on_batch", record)

    def send(i: int) -> dict[str, Any]:
        user, key = setup.users[i]
        r = client.post(f"/users/{user}/generate", json=greedy(PROMPTS[i], NEW_TOKENS), headers=bearer(key))
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(send, range(len(PROMPTS))))
    assert sizes == [len(PROMPTS)]  # one mixed batch: 8 adapters + 1 base row

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


def _peft_step_logits(model: Any, ids: list[int], tokens: list[int], steps: int) -> torch.Tensor:
    """PEFT's logits for the first `steps` generated positions (one forward of prompt + emitted tokens)."""
    with torch.inference_mode():
        logits: torch.Tensor = model(input_ids=torch.tensor([ids + tokens[: steps - 1]])).logits[0].float()
    return logits[len(ids) - 1 :]


def test_mixed_batch_logits_match_peft(setup: Setup) -> None:
    state = app_state(setup.client)
    assert state.cache is not None and state.runtime is not None
    keys: list[AdapterKey | None] = []
    for i, (user, key) in enumerate(setup.users):
        meta = setup.client.get(f"/users/{user}/adapter", headers=bearer(key))
        if i < len(SPECS):
            keys.append(AdapterKey(storage_key(setup.client, user), 1, meta.json()["sha256"]))
        else:
            assert meta.status_code == 404
            keys.append(None)
    stops = stop_token_ids(setup.tokenizer, setup.base.config)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=stops)
    ids = [encode_prompt(setup.tokenizer, p) for p in PROMPTS]
    # The scheduler thread is idle (no request in flight): drive the generator directly with cached slots.
    slots = state.cache.acquire(keys)
    try:
        assert slots[-1] == 0 and len(set(slots[:-1])) == len(SPECS)
        rows = [GenRow(i, params, s) for i, s in zip(ids, slots, strict=True)]
        outs = state.runtime.generator.generate(rows, return_logits=True)
    finally:
        state.cache.release(keys)
    assert state.cache.pinned() == {}
    for i, out in enumerate(outs):
        model = setup.base if keys[i] is None else peft_model(setup.base, setup.adapter_dirs[i])
        assert out.step_logits  # one per sampled token (a final stop token included)
        got = torch.stack(out.step_logits)
        want = _peft_step_logits(model, ids[i], out.token_ids, len(out.step_logits))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"row {i}: {m}")
