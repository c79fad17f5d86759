"""GET /metrics exposes the documented series with real values after traffic."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.orm import sessionmaker

from service.engine.types import EngineStats
from service.metrics import FieldCollector
from tests.conftest import bearer, builtin_engine, create_user, running_app
from tests.factories import Samples, lora_zip, make_lora, samples, upload
from tests.models import load_base


def test_metrics_after_traffic(sqlite_client: TestClient) -> None:
    key = create_user(sqlite_client, "metrics-user")
    body = {"prompt": "hello", "max_new_tokens": 3, "temperature": 0}
    assert sqlite_client.post("/users/metrics-user/generate", json=body, headers=bearer(key)).status_code == 200
    assert sqlite_client.get("/users/metrics-user/history", headers=bearer("nope")).status_code == 401
    text = sqlite_client.get("/metrics").text
    assert 'oppu_http_requests_total{method="POST",route="/users/{user_id}/generate",status="200"}' in text
    assert 'route="/users/{user_id}/history",status="401"' in text
    assert "metrics-user" not in text  # user ids never become label values
    assert "oppu_batch_size_count" in text and "oppu_generated_tokens_total" in text
    tokens = [line for line in text.splitlines() if line.startswith("oppu_generated_tokens_total")]
    assert float(tokens[0].split()[-1]) >= 1
    for name in (
        "oppu_adapter_slots_in_use",
        "oppu_job_queue_depth",
        "oppu_stale_adapters",
        "oppu_jobs",
        "oppu_adapter_cache_events",
        "oppu_adapter_swap_seconds",
        "oppu_generate_queue_depth",
    ):
        assert name in text, name


def test_queue_refusals_are_counted_by_reason(sqlite_client: TestClient) -> None:
    """oppu_rejected_requests_total was documented and charted but never counted."""

    def per_user() -> float:
        series = 'oppu_rejected_requests_total{reason="per_user"} '
        lines = [line for line in sqlite_client.get("/metrics").text.splitlines() if line.startswith(series)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = per_user()
    for hook in builtin_engine(sqlite_client).on_reject:  # what the queue calls when it refuses (tests/engine)
        hook("per_user")
    assert per_user() == before + 1


def test_invented_methods_do_not_grow_the_http_series(sqlite_client: TestClient) -> None:
    """2,000 requests with invented HTTP methods: the HTTP family stays under 200 series (methods -> other)."""
    for i in range(2000):
        sqlite_client.request(f"X{i:04d}", "/healthz")
    text = sqlite_client.get("/metrics").text
    series = [
        line for line in text.splitlines() if line.startswith(("oppu_http_requests_total", "oppu_http_request_seconds"))
    ]
    assert len(series) < 200, len(series)
    assert 'method="other"' in text and "X0001" not in text


def test_metrics_token(tmp_path: Path, tiny_model_path: Path) -> None:
    with running_app(tmp_path, tiny_model_path, metrics_token="s3cret-metrics") as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer("wrong")).status_code == 401
        r = client.get("/metrics", headers=bearer("s3cret-metrics"))
        assert r.status_code == 200 and "oppu_http_requests_total" in r.text
        for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive (RFC 7235), as for API keys
            assert client.get("/metrics", headers={"Authorization": f"{scheme} s3cret-metrics"}).status_code == 200


def test_wrong_metrics_tokens_are_rate_limited(tmp_path: Path, tiny_model_path: Path) -> None:
    """Guesses at the metrics token were never limited: every wrong one got 401. They are failed auths for the
    client address, like bad API keys; once blocked, even the right token gets 429 (it is not compared, so a
    blocked guesser learns nothing), until the window slides."""
    with running_app(tmp_path, tiny_model_path, metrics_token="s3cret-metrics", auth_max_failures=3) as client:
        assert client.get("/metrics").status_code == 401  # no token at all is a failure too
        for _ in range(2):
            assert client.get("/metrics", headers=bearer("wrong")).status_code == 401
        for token in ("wrong", "s3cret-metrics"):
            r = client.get("/metrics", headers=bearer(token))
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, token
            assert r.json()["code"] == "too_many_requests"
        assert client.get("/users/x/history", headers=bearer("oppu_wrong")).status_code == 429  # one limiter


def one(page: Samples, name: str) -> float:
    (( _, value),) = page[name]
    return value


def test_field_series_follow_engine_stats() -> None:
    """vLLM's semantics from EngineStats: running = rows in the batch, waiting = admitted not running, KV usage
    as a 0..1 fraction of the KV lanes, lora_requests_info valued with the sample's time; no KV series for an
    engine that does not report its KV memory."""
    stats = EngineStats(
        waiting=2, running=3, adapter_slots=4, slots_in_use=0, slots_pinned=0,
        extra={"kv_lanes": 8.0, "kv_lanes_free": 2.0},
    )  # fmt: skip
    registry = CollectorRegistry()
    registry.register(FieldCollector(lambda: stats, None, sessionmaker(), clock=lambda: 1234.5))
    page = samples(generate_latest(registry).decode())
    assert one(page, "vllm:num_requests_waiting") == 2 and one(page, "vllm:num_requests_running") == 3
    assert one(page, "vllm:kv_cache_usage_perc") == 0.75
    assert one(page, "vllm:max_gpu_lora_adapters") == 4 and one(page, "vllm:num_gpu_loaded_lora_adapters") == 0
    ((labels, value),) = page["vllm:lora_requests_info"]
    assert labels == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""} and value == 1234.5
    no_kv = CollectorRegistry()
    no_kv.register(FieldCollector(lambda: EngineStats(0, 0, 1, 0, 0), None, sessionmaker()))
    assert "vllm:kv_cache_usage_perc" not in generate_latest(no_kv).decode()


def test_field_series_read_planted_states(tmp_path: Path, tiny_model_path: Path) -> None:
    """One adapter slot. c, then a are served (c falls to the host tier, a holds the slot); a long row of a's
    runs and pins it; b's request then queues (no free slot) with b's adapter prefetched to host RAM.
    /metrics shows each state in vLLM's series, adapters named as a router names them (user:<id>)."""
    base = load_base(tiny_model_path)
    data = lora_zip(make_lora(base, tmp_path / "lora", seed=5, r=4, targets=("q_proj", "v_proj")))
    body = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0, "retrieval_k": 0}
    with running_app(tmp_path / "app", tiny_model_path, adapter_slots=1, metrics_token="tok") as client:
        keys = {u: create_user(client, u) for u in ("c", "a", "b")}
        for user, key in keys.items():
            assert upload(client, user, key, data).status_code == 201
        for user in ("c", "a"):
            assert client.post(f"/users/{user}/generate", json=body, headers=bearer(keys[user])).status_code == 200
        engine = builtin_engine(client)
        cache = engine.cache
        (ref_a,) = cache.slot_keys()
        tick = engine._tick

        def slow_tick() -> bool:  # a's long row below runs for seconds
            time.sleep(0.05)
            return tick()

        engine._tick = slow_tick  # type: ignore[method-assign]
        result: dict[str, Any] = {}
        long_a = {**body, "max_new_tokens": 200}
        running = threading.Thread(
            target=lambda: result.update(a=client.post("/users/a/generate", json=long_a, headers=bearer(keys["a"])))
        )
        queued = threading.Thread(
            target=lambda: result.update(r=client.post("/users/b/generate", json=body, headers=bearer(keys["b"])))
        )
        try:
            running.start()
            deadline = time.monotonic() + 30
            while engine.stats().running == 0:  # a's row runs and pins a's slot
                assert time.monotonic() < deadline and running.is_alive(), "a's row never ran"
                time.sleep(0.02)
            queued.start()
            while engine.stats().waiting == 0:  # b's row waits for the one slot
                assert time.monotonic() < deadline and queued.is_alive(), "b's row never queued"
                time.sleep(0.02)
            assert client.get("/metrics").status_code == 401  # the new series stay behind the token
            page = samples(client.get("/metrics", headers=bearer("tok")).text)
        finally:
            del engine._tick
            running.join(60)
            queued.join(60)
        assert result["r"].status_code == 200, result["r"].text
        assert result["a"].status_code == 200, result["a"].text
        after = samples(client.get("/metrics", headers=bearer("tok")).text)

    assert one(page, "vllm:num_requests_waiting") == 1 and one(page, "vllm:num_requests_running") == 1
    assert one(page, "vllm:max_gpu_lora_adapters") == 1 and one(page, "vllm:num_gpu_loaded_lora_adapters") == 1
    assert 0 <= one(page, "vllm:kv_cache_usage_perc") <= 1
    loaded = {(s["adapter_name"], s["level"], s["pinned"]): v for s, v in page["vllm:lora_adapter_loaded"]}
    assert loaded == {
        ("user:a", "gpu", "true"): 1,
        ("user:a", "cpu", "false"): 1,
        ("user:b", "cpu", "false"): 1,  # prefetched by b's request, waiting for the slot
        ("user:c", "cpu", "false"): 1,  # evicted from the slot by a, still in host RAM
    }
    assert {s["rank"] for s, _ in page["vllm:lora_adapter_loaded"]} == {"4"}
    ((info, stamp),) = page["vllm:lora_requests_info"]
    assert info["max_lora"] == "1" and info["running_lora_adapters"] == "user:a"
    assert info["waiting_lora_adapters"] == "user:b"
    assert abs(stamp - time.time()) < 60
    field = "\n".join(str(s) for name, series in page.items() if name.startswith("vllm:") for s in series)
    assert ref_a.owner_key not in field and str(tmp_path) not in field  # no storage key or path in a label

    assert one(after, "vllm:num_requests_waiting") == 0
    gpu = [s for s, _ in after["vllm:lora_adapter_loaded"] if s["level"] == "gpu"]
    assert [(s["adapter_name"], s["pinned"]) for s in gpu] == [("user:b", "false")]
    ((info, _),) = after["vllm:lora_requests_info"]
    assert info["running_lora_adapters"] == "" and info["waiting_lora_adapters"] == ""


def test_a_request_whose_client_left_before_the_answer_counts_as_499_not_500() -> None:
    """CancelOnDisconnect cancels the handler (the task running HttpMetrics' inner app)."""
    import asyncio

    from service.metrics import CLIENT_CLOSED, HttpMetrics, Metrics

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        raise asyncio.CancelledError  # cancelled while generating, before any byte of the answer

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("a bug")

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    metrics = Metrics()
    for app in (handler, failing):
        try:
            asyncio.run(HttpMetrics(app, metrics)({"type": "http", "method": "POST"}, receive, send))
        except (asyncio.CancelledError, RuntimeError):
            pass
    page = samples(generate_latest(metrics.registry).decode())
    statuses = {labels["status"]: value for labels, value in page["oppu_http_requests_total"]}
    assert statuses == {str(CLIENT_CLOSED): 1.0, "500": 1.0}


def test_a_scrape_while_the_database_is_down_keeps_the_other_series(tmp_path: Path) -> None:
    """The SQL-backed families raised out of the scrape: /metrics answered 500 and every series vanished exactly
    when an operator needs them. Now they are skipped and oppu_metrics_sql_up says so."""
    from sqlalchemy import create_engine

    from service.adapters.cache import Resident
    from service.engine.types import AdapterRef
    from service.metrics import SqlStateCollector

    down = sessionmaker(create_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'db.sqlite3'}"))
    registry = CollectorRegistry()
    registry.register(SqlStateCollector(down))
    stats = EngineStats(waiting=2, running=1, adapter_slots=2, slots_in_use=1, slots_pinned=0)
    residents = [Resident(AdapterRef("k" * 32, 1, "0" * 64, tmp_path), "slot", False, 8)]  # its name needs SQL
    registry.register(FieldCollector(lambda: stats, lambda: residents, down))
    text = generate_latest(registry).decode()
    assert "oppu_metrics_sql_up 0.0" in text and "oppu_jobs" not in text
    assert "vllm:num_requests_waiting 2.0" in text


def test_a_scrape_while_redis_is_down_keeps_the_other_series(tmp_path: Path, tiny_model_path: Path) -> None:
    """The job queue's depth came from Redis inside the route: with Redis down /metrics was a 500 (and the
    router lost the vLLM series it scores on) while /readyz said ready. Now it is skipped and
    oppu_job_queue_up says so."""
    with running_app(tmp_path, tiny_model_path, redis_url="redis://127.0.0.1:1/0") as client:
        assert client.get("/readyz").status_code == 200  # Redis is optional for serving
        r = client.get("/metrics")
        assert r.status_code == 200, r.text[:300]
        page = samples(r.text)
        assert page["oppu_job_queue_up"] == [({}, 0.0)] and "oppu_job_queue_depth" not in page
        assert "oppu_generate_queue_depth" in page and "vllm:num_requests_waiting" in page


def test_the_job_queue_depth_is_read_at_scrape_time(sqlite_client: TestClient) -> None:
    page = samples(sqlite_client.get("/metrics").text)
    assert page["oppu_job_queue_up"] == [({}, 1.0)] and page["oppu_job_queue_depth"] == [({}, 0.0)]
