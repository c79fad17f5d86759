"""End to end on the REAL default model (SmolLM2-135M-Instruct) through HTTP, on SQLite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.config import DEFAULT_MODEL
from tests.conftest import bearer, create_user, running_app

pytestmark = pytest.mark.e2e

ITEMS = [
    "The espresso at the corner cafe was bitter and burnt, two stars.",
    "A quiet hotel by the lake with friendly staff and a great breakfast buffet.",
    "This mechanical keyboard has clicky blue switches and a sturdy aluminium frame.",
    "The hiking trail up the north ridge was steep, muddy and absolutely worth it.",
    "My favourite sci-fi novel explores first contact with a silent alien ship.",
    "The pizza crust was thin and crispy but the tomato sauce lacked salt.",
    "Noise cancelling headphones saved my sanity on the long overnight flight.",
    "The museum's dinosaur hall is huge; kids loved the moving tyrannosaurus.",
    "Our vegetable garden produced far too many zucchini again this summer.",
    "The budget smartphone camera struggles badly in low light but the battery lasts.",
]
OTHER_ITEMS = [f"{text} (someone else's copy)" for text in ITEMS]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    with running_app(tmp_path_factory.mktemp("e2e"), DEFAULT_MODEL, device="cpu") as client:
        key = create_user(client, "alice")
        other = create_user(client, "bob")
        items = [{"id": f"a{i}", "output": t} for i, t in enumerate(ITEMS)]
        assert client.post("/users/alice/history", json={"items": items}, headers=bearer(key)).status_code == 201
        theirs = [{"id": f"b{i}", "output": t} for i, t in enumerate(OTHER_ITEMS)]
        assert client.post("/users/bob/history", json={"items": theirs}, headers=bearer(other)).status_code == 201
        yield client, key


def test_greedy_generate_is_deterministic_english(e2e: tuple[TestClient, str]) -> None:
    client, key = e2e
    body = {
        "prompt": "Write one sentence about the weather today.",
        "max_new_tokens": 24,
        "temperature": 0,
        "retrieval_k": 0,
        "use_profile": False,
    }
    first = client.post("/users/alice/generate", json=body, headers=bearer(key))
    second = client.post("/users/alice/generate", json=body, headers=bearer(key))
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    a, b = first.json(), second.json()
    assert a["text"] == b["text"]
    text = a["text"].strip()
    assert text, a
    letters = sum(c.isascii() and c.isalpha() for c in text)
    assert letters / len(text) > 0.6 and " " in text, text  # English words, not byte soup
    assert a["usage"]["completion_tokens"] <= 24 and a["usage"]["prompt_tokens"] > 0
    assert a["retrieved"] == [] and a["adapter_version"] is None


@pytest.mark.parametrize("target", [2, 5, 9])
def test_retrieved_are_own_items_best_first(e2e: tuple[TestClient, str], target: int) -> None:
    client, key = e2e
    body = {"prompt": ITEMS[target], "max_new_tokens": 2, "temperature": 0, "retrieval_k": 5}
    r = client.post("/users/alice/generate", json=body, headers=bearer(key))
    assert r.status_code == 200, r.text
    retrieved = r.json()["retrieved"]
    ids = [h["id"] for h in retrieved]
    assert ids[0] == f"a{target}", retrieved
    assert all(i.startswith("a") for i in ids), retrieved  # never Bob's near-copies
    scores = [h["score"] for h in retrieved]
    assert scores == sorted(scores, reverse=True)
    assert len(scores) == 1 or scores[0] > scores[1]  # the exact match is strictly best
