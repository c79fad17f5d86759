"""Foundation figures; prints ONE JSON object, each figure with its baseline measured in the same run.

1. History append throughput through HTTP (batches of 100) on the embedded SQLite default.
2. BM25 top-5 latency for one user with 10,000 items on the cached-index path
   (`service.history.service.retrieve` with a warm BM25Cache: one unit of work + the SQL stamp check),
   plus the cold index build time.
3. Generate latency through HTTP vs the engine called directly (the same prepared request: the preparation
   step's output, run by `engine.base.collect`) on the real default model, greedy; `http_overhead_ratio` =
   http / direct - 1.

The server is a real uvicorn on 127.0.0.1 (a thread of this process) and the client is httpx with
keep-alive. Usage: .venv/bin/python bench/foundation.py [--batches 20] [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from sqlalchemy import text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import DEFAULT_MODEL, Settings  # noqa: E402
from service.db.migrate import upgrade  # noqa: E402
from service.db.session import unit_of_work  # noqa: E402
from service.engine.base import collect  # noqa: E402
from service.generation.schemas import GenerateIn  # noqa: E402
from service.history.service import retrieve, user_corpus  # noqa: E402
from service.main import create_app  # noqa: E402
from service.state import AppState  # noqa: E402
from service.tenancy import Caller, authorize_user  # noqa: E402

ADMIN_KEY = "bench-admin-key-0123456789abcdef"
TARGETS = {"append_items_per_s_min": 2000, "bm25_p99_ms_max": 20.0, "http_overhead_ratio_max": 0.10}
WORDS = (
    "coffee espresso bitter sweet hotel lake staff breakfast keyboard switch frame hiking trail ridge muddy "
    "novel alien ship contact pizza crust tomato sauce salt headphones flight museum dinosaur garden zucchini "
    "summer camera battery light phone screen movie actor plot ending soundtrack book chapter author review "
    "price delivery quality recommend broken return refund gift family weekend city beach mountain winter "
    "rain sunny train bus ticket restaurant waiter dessert chocolate cheese bread wine beer tea green spicy"
).split()
PROMPT = "Write one short sentence about your favourite season."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[pos]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """uvicorn serving the app on 127.0.0.1 in a background thread (lifespan on: loads the model)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 600
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def create_user(http: httpx.Client, user_id: str) -> dict[str, str]:
    r = http.post("/admin/users", json={"user_id": user_id}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def wait_for_rows(state: AppState, user_id: str, n: int) -> None:
    """Until `n` rows of the user are visible to another connection: today the HTTP 201 is sent before the
    request's commit (deps.SessionDep runs its commit after the response), so a client can be early."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with state.db.engine.connect() as conn:
            count = conn.execute(
                text("SELECT count(*) FROM history_items h JOIN users u ON u.id = h.user_pk WHERE u.user_id = :u"),
                {"u": user_id},
            ).scalar_one()
        if count >= n:
            return
        time.sleep(0.001)
    raise RuntimeError(f"{user_id}: {count} rows visible, expected {n}")


def bench_append(http: httpx.Client, state: AppState, batches: int, rng: random.Random) -> dict[str, Any]:
    headers = create_user(http, "appender")
    bodies = [
        {
            "items": [
                {"id": f"b{b}-{i}", "input": sentence(rng, 6), "output": sentence(rng, 20), "kind": "review"}
                for i in range(100)
            ]
        }
        for b in range(batches + 1)
    ]
    http.post("/users/appender/history", json=bodies[0], headers=headers).raise_for_status()  # warm-up
    latencies = []
    start = time.perf_counter()
    for body in bodies[1:]:
        t0 = time.perf_counter()
        r = http.post("/users/appender/history", json=body, headers=headers)
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 201 and r.json()["added"] == 100, r.text
    wait_for_rows(state, "appender", (batches + 1) * 100)  # the last commit is part of the work
    elapsed = time.perf_counter() - start
    return {
        "batches": batches,
        "batch_size": 100,
        "items_per_s": round(batches * 100 / elapsed, 1),
        "batch_latency_ms_p50": round(statistics.median(latencies) * 1000, 2),
        "batch_latency_ms_p99": round(percentile(latencies, 99) * 1000, 2),
    }


def bench_bm25(http: httpx.Client, state: AppState, queries: int, rng: random.Random) -> dict[str, Any]:
    headers = create_user(http, "reader")
    for b in range(10):
        items = [{"id": f"r{b}-{i}", "output": sentence(rng, rng.randint(8, 40))} for i in range(1000)]
        r = http.post("/users/reader/history", json={"items": items}, headers=headers)
        assert r.status_code == 201 and r.json()["added"] == 1000, r.text
    wait_for_rows(state, "reader", 10_000)
    with unit_of_work(state.session_factory) as session:
        user = authorize_user(session, Caller(is_admin=True), "reader")
    state.bm25.invalidate(user.storage_key)
    t0 = time.perf_counter()
    with unit_of_work(state.session_factory) as session:
        corpus = user_corpus(session, user, state.bm25)  # cold: SQL load + index build
    build_s = time.perf_counter() - t0
    assert len(corpus.docs) == 10_000, len(corpus.docs)
    texts = [" ".join(rng.sample(WORDS, rng.randint(2, 6))) for _ in range(queries + 20)]
    latencies = []
    for i, query in enumerate(texts):
        t0 = time.perf_counter()
        with unit_of_work(state.session_factory) as session:  # what a generate request does
            hits = retrieve(session, user, query, 5, state.bm25)
        if i >= 20:  # the first 20 are warm-up
            latencies.append(time.perf_counter() - t0)
        assert len(hits) == 5
    return {
        "items": 10_000,
        "k": 5,
        "queries": queries,
        "path": "service.history.service.retrieve, warm BM25Cache, one unit of work + SQL stamp per query",
        "index_build_ms": round(build_s * 1000, 1),
        "query_ms_p50": round(statistics.median(latencies) * 1000, 3),
        "query_ms_p99": round(percentile(latencies, 99) * 1000, 3),
    }


def bench_generate(http: httpx.Client, state: AppState, runs: int, new_tokens: int) -> dict[str, Any]:
    headers = create_user(http, "writer")
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "temperature": 0, "retrieval_k": 0, "use_profile": False}
    with unit_of_work(state.session_factory) as session:
        user = authorize_user(session, Caller(is_admin=True), "writer")
    spec = GenerateIn(**{k: v for k, v in body.items()}).spec(user)
    prepared = state.preparer.prepare(spec)  # the HTTP path's prompt is the bare request (no context)

    def via_http() -> tuple[float, str, int]:
        t0 = time.perf_counter()
        r = http.post("/users/writer/generate", json=body, headers=headers)
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        out = r.json()
        return elapsed, out["text"], out["usage"]["completion_tokens"]

    def direct() -> tuple[float, str, int]:
        t0 = time.perf_counter()
        done = asyncio.run(collect(state.engine, replace(prepared.request, deadline=time.monotonic() + 600)))
        return time.perf_counter() - t0, state.preparer.codec.decode(done.token_ids), len(done.token_ids)

    via_http(), direct()  # warm-up
    http_s: list[float] = []
    direct_s: list[float] = []
    texts: set[str] = set()
    tokens: set[int] = set()
    for _ in range(runs):  # interleaved, so that drift (thermal, other load) hits both alike
        for fn, sink in ((via_http, http_s), (direct, direct_s)):
            seconds, text, n = fn()
            sink.append(seconds)
            texts.add(text)
            tokens.add(n)
    http_med, direct_med = statistics.median(http_s), statistics.median(direct_s)
    paired = statistics.median(h / d for h, d in zip(http_s, direct_s, strict=True))
    return {
        "model": state.engine.model_name,
        "torch_threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "completion_tokens": sorted(tokens),
        "same_text_http_and_direct": len(texts) == 1,
        "runs": runs,
        "http_ms_median": round(http_med * 1000, 1),
        "direct_ms_median": round(direct_med * 1000, 1),
        "http_ms_min": round(min(http_s) * 1000, 1),
        "direct_ms_min": round(min(direct_s) * 1000, 1),
        "http_overhead_ratio": round(http_med / direct_med - 1, 4),
        # Steadier estimates on a shared, loaded machine: each HTTP run against the direct run right after
        # it (drift cancels), and the least disturbed run of each.
        "http_overhead_ratio_paired_median": round(paired - 1, 4),
        "http_overhead_ratio_of_minimums": round(min(http_s) / min(direct_s) - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    rng = random.Random(0)
    load_before = os.getloadavg()[0]
    cache = REPO / ".cache" / "models"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'oppu.sqlite3'}"
        upgrade(url)
        settings = Settings(
            data_dir=Path(tmp),
            database_url=url,
            adapters_dir=Path(tmp) / "adapters",
            model=args.model,
            model_cache_dir=cache if cache.is_dir() else None,
            admin_key=ADMIN_KEY,
        )
        app = create_app(settings)
        state: AppState = app.state.oppu
        with Server(app) as base_url, httpx.Client(base_url=base_url, timeout=600) as http:
            append = bench_append(http, state, args.batches, rng)
            bm25 = bench_bm25(http, state, args.queries, rng)
            generate = bench_generate(http, state, args.runs, args.new_tokens)
    result = {
        "bench": "foundation",
        "server": "uvicorn on 127.0.0.1 (thread in this process), httpx keep-alive client",
        "database": "sqlite (embedded default: WAL, synchronous=NORMAL)",
        "cpus": os.cpu_count(),
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "history_append": append,
        "bm25": bm25,
        "generate": generate,
        "targets": TARGETS,
        "meets_targets": {
            "append": append["items_per_s"] >= TARGETS["append_items_per_s_min"],
            "bm25_p99": bm25["query_ms_p99"] <= TARGETS["bm25_p99_ms_max"],
            "http_overhead": generate["http_overhead_ratio"] <= TARGETS["http_overhead_ratio_max"],
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
