"""POST /users/{id}/score (tiny model, fp32): each candidate's logprob as the answer equals a direct forward of
PEFT's model on the same tokens within 1e-4; retrieval and the adapter shape it as they shape generation;
bad input is a 4xx JSON error."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from service.inference.tokens import encode_prompt
from tests.conftest import bearer, create_user, running_app
from tests.factories import lora_zip, make_lora, peft_model, upload
from tests.models import load_base

CANDIDATES = ["1.0", "2.5", "5.0", "a much longer answer with several tokens"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[tuple[TestClient, Any, Path]]:
    tmp = tmp_path_factory.mktemp("score")
    base = load_base(tiny_model_path)
    lora = make_lora(base, tmp / "lora", seed=5, r=8, targets=("q_proj", "v_proj", "up_proj"))
    with running_app(tmp, tiny_model_path) as client:
        yield client, base, lora


def reference(model: Any, tokenizer: Any, prompt: str, candidate: str) -> float:
    ids = encode_prompt(tokenizer, prompt)
    cont = [int(i) for i in tokenizer(candidate, add_special_tokens=False)["input_ids"]]
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].float(), dim=-1)
    return sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(cont))


def test_candidate_logprobs_equal_a_direct_forward(scored: tuple[TestClient, Any, Path], tiny_model_path: Path) -> None:
    client, base, lora = scored
    key = create_user(client, "scorer")
    assert upload(client, "scorer", key, lora_zip(lora)).status_code == 201
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = "Rate the movie Heat (1995)."
    body = {"prompt": prompt, "candidates": CANDIDATES, "retrieval_k": 0, "use_profile": False}
    with_adapter = client.post("/users/scorer/score", json=body, headers=bearer(key))
    without = client.post("/users/scorer/score", json={**body, "use_adapter": False}, headers=bearer(key))
    assert with_adapter.status_code == 200 and without.status_code == 200, with_adapter.text
    for answer, model in ((with_adapter.json(), peft_model(base, lora)), (without.json(), base)):
        probs = []
        for cand, out in zip(CANDIDATES, answer["candidates"], strict=True):
            want = reference(model, tokenizer, prompt, cand)
            assert out["text"] == cand and abs(out["logprob"] - want) < 1e-4, (cand, out, want)
            assert abs(out["mean_logprob"] - out["logprob"] / out["tokens"]) < 1e-9
            probs.append(out["probability"])
        assert abs(sum(probs) - 1.0) < 1e-6
        totals = [c["logprob"] for c in answer["candidates"]]
        assert max(range(len(probs)), key=probs.__getitem__) == max(range(len(totals)), key=totals.__getitem__)
    assert with_adapter.json()["adapter_version"] == 1 and without.json()["adapter_version"] is None
    assert with_adapter.json()["candidates"] != without.json()["candidates"]  # the adapter changes the scores
    usage = with_adapter.json()["usage"]
    assert usage["candidate_tokens"] == sum(c["tokens"] for c in with_adapter.json()["candidates"])


def test_retrieval_shapes_the_scored_prompt(scored: tuple[TestClient, Any, Path]) -> None:
    client, _, _ = scored
    key = create_user(client, "scorer-rag")
    items = [{"id": f"h{i}", "input": f"Heat {i}", "output": f"{i}.0"} for i in range(1, 4)]
    assert client.post("/users/scorer-rag/history", json={"items": items}, headers=bearer(key)).status_code == 201
    body = {"prompt": "Heat", "candidates": ["4.0", "3.0"], "use_profile": False}
    plain = client.post("/users/scorer-rag/score", json={**body, "retrieval_k": 0}, headers=bearer(key)).json()
    rag = client.post("/users/scorer-rag/score", json={**body, "retrieval_k": 2}, headers=bearer(key)).json()
    assert plain["retrieved"] == [] and len(rag["retrieved"]) == 2
    assert rag["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert not math.isclose(rag["candidates"][0]["logprob"], plain["candidates"][0]["logprob"])


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "candidates": []},
        {"prompt": "x", "candidates": ["a"] * 33},
        {"prompt": "x", "candidates": [""]},
        {"prompt": "x", "candidates": ["a" * 1001]},
        {"prompt": "", "candidates": ["a"]},
        {"prompt": "x", "candidates": ["a"], "temperature": 0.5},
        {"prompt": "x", "candidates": "a"},
        {"prompt": "x", "candidates": ["a"], "retrieval_k": 11},
        {"prompt": "x"},
        {"prompt": "x", "candidates": ["word " * 190] * 20},  # more tokens than a row can hold
    ],
)
def test_bad_input_is_a_4xx_json_error(
    scored: tuple[TestClient, Any, Path], body: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    client, _, _ = scored
    user = "bad-" + request.node.callspec.id
    key = create_user(client, user)
    r = client.post(f"/users/{user}/score", json=body, headers=bearer(key))
    assert 400 <= r.status_code < 500, r.text
    assert {"code", "message"} <= set(r.json())
