"""BM25 at a large history (issue 23 N6), against the app as it serves (tiny model, TestClient, SQLite): after
an append to a history of 8 M characters, generate stays within 1.5x of a small history's p50, because the
cached index is extended with the new item instead of being rebuilt whole on the request path. Part of the
reliability suite's faults group (CI).

The history is sent through the history API (1,000 items of 1,000 characters per request, under the item
and body limits), so the quota and the SQL path are the real ones."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import ADMIN_KEY, app_state, bearer, running_app

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ITEM_CHARS = 1_000
BATCH = 1_000  # items per append request: the API's limit
BIG_CHARS = 8_000_000


def words(rng: random.Random, n: int) -> list[str]:
    # A Zipf-like vocabulary of pseudo-words (some frequent, many rare), like real reviews.
    return [f"w{int(rng.paretovariate(1.1)) % 50_000:x}" for _ in range(n)]


def item_text(rng: random.Random) -> str:
    text = ""
    while len(text) < ITEM_CHARS:
        text += " ".join(words(rng, 40)) + " "
    return text[:ITEM_CHARS]


def append(client: TestClient, user: str, key: str, items: list[dict[str, str]]) -> None:
    r = client.post(f"/users/{user}/history", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text[:300]


def generate_ms(client: TestClient, user: str, key: str, prompt: str) -> float:
    started = time.perf_counter()
    r = client.post(
        f"/users/{user}/generate",
        json={"prompt": prompt, "max_new_tokens": 2, "temperature": 0.0, "retrieval_k": 3},
        headers=bearer(key),
    )
    elapsed = (time.perf_counter() - started) * 1000.0
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["retrieved"]) == 3  # retrieval really ran over the history
    return elapsed


def test_append_at_8m_chars_keeps_generate_p50_within_1_5x_of_a_small_history(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    rng = random.Random(0)
    with running_app(tmp_path, tiny_model_path) as client:
        keys = {}
        for user in ("big", "small"):
            r = client.post("/admin/users", json={"user_id": user}, headers=ADMIN)
            assert r.status_code == 201, r.text
            keys[user] = r.json()["api_key"]
        # Items are drawn from a pool, so building 8 M characters costs little CPU here; ids keep them apart.
        pool = [item_text(rng) for _ in range(200)]
        n_big = BIG_CHARS // ITEM_CHARS
        for start in range(0, n_big, BATCH):
            batch = [{"id": f"b{i}", "output": pool[i % len(pool)]} for i in range(start, min(n_big, start + BATCH))]
            append(client, "big", keys["big"], batch)
        append(client, "small", keys["small"], [{"id": f"s{i}", "output": pool[i]} for i in range(20)])
        for user in ("big", "small"):  # the first generate builds each user's index (cold, off the measure)
            generate_ms(client, user, keys[user], " ".join(words(rng, 12)))

        timings: dict[str, list[float]] = {"big": [], "small": []}
        for i in range(11):  # interleaved, so that the shared machine's load hits both alike
            for user in ("big", "small"):
                append(client, user, keys[user], [{"id": f"new{i}", "output": item_text(rng)}])
                prompt = " ".join(words(rng, 12))
                timings[user].append(generate_ms(client, user, keys[user], prompt))
        big, small = statistics.median(timings["big"]), statistics.median(timings["small"])
        cached_mb = app_state(client).bm25.nbytes / 1e6
        print(f"generate after an append, p50: 8 M chars {big:.1f} ms, small {small:.1f} ms; cache {cached_mb:.0f} MB")
        assert big <= 1.5 * small, (timings, "an append must not rebuild the index whole on the request path")


def test_the_budget_settings_reach_the_index(tmp_path: Path, tiny_model_path: Path) -> None:
    """OPPU_RETRIEVAL_MAX_CHARS: generate retrieves from the most recent characters only (older items, even the
    best match, are out of the index); OPPU_BM25_CACHE_BYTES bounds the cache (the newest entry stays)."""
    with running_app(tmp_path, tiny_model_path, retrieval_max_chars=100, bm25_cache_bytes=1) as client:
        keys = {}
        for user in ("ann", "ben"):
            r = client.post("/admin/users", json={"user_id": user}, headers=ADMIN)
            keys[user] = r.json()["api_key"]
            # 20 characters each: the window holds the last five
            items = [{"id": f"{user}{i}", "output": f"green tea item {i:05d}"} for i in range(8)]
            items[0]["output"] = "pizza pizza pizza 00"
            append(client, user, keys[user], items)
        for user in ("ann", "ben"):
            r = client.post(
                f"/users/{user}/generate",
                json={"prompt": "pizza green", "max_new_tokens": 1, "retrieval_k": 10},
                headers=bearer(keys[user]),
            )
            assert r.status_code == 200, r.text
            assert sorted(h["id"] for h in r.json()["retrieved"]) == [f"{user}{i}" for i in range(3, 8)]
        state = app_state(client)
        assert state.bm25.window_chars == 100 and len(state.bm25._entries) == 1  # 1 byte: only the newest
