"""deploy/grafana/oppu.json: every query names only metrics that the app's /metrics exposes (scraped here after
traffic), and the dashboard covers what it promises (traffic, latency, tok/s, queues, batch size, adapter
residency and cold loads, training jobs)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import bearer, create_user

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "oppu.json"
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
PROMQL_WORDS = frozenset(
    {"sum", "count", "max", "min", "avg", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
     "unless", "offset", "bool", "topk", "bottomk", "quantile", "stddev", "stdvar", "inf", "nan"}
)  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords, label names
    (inside {...} or by/without (...)), strings, durations or numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for match in IDENT.finditer(expr):
        word, rest = match[0], expr[match.end() :].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("("):  # keyword or function call
            continue
        if match.start() > 0 and (expr[match.start() - 1].isdigit() or expr[match.start() - 1] == "."):
            continue  # the exponent or tail of a number
        names.add(word)
    return names


def exposed(text: str) -> set[str]:
    """Every sample name /metrics can carry: samples present, and each family's names from its TYPE line (a
    labelled family with no sample yet still declares itself)."""
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "counter":
            names |= {name, name if name.endswith("_total") else f"{name}_total"}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def queries() -> list[tuple[str, str]]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_metric_names_reads_promql() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{x="y(z)"}[5m]))) / ignoring(b) c:d + 1e3'
    assert metric_names(expr) == {"a_bucket", "c:d"}
    assert metric_names("sum(rate(nope_total[5m]))") == {"nope_total"}


def test_every_query_names_an_exposed_metric(sqlite_client: TestClient) -> None:
    key = create_user(sqlite_client, "grafana-user")
    body = {"prompt": "hello", "max_new_tokens": 3, "temperature": 0}
    assert sqlite_client.post("/users/grafana-user/generate", json=body, headers=bearer(key)).status_code == 200
    available = exposed(sqlite_client.get("/metrics").text)
    assert "nope_total" not in available  # the check can fail
    missing = {(title, name) for title, expr in queries() for name in metric_names(expr) if name not in available}
    assert not missing, sorted(missing)


@pytest.mark.parametrize(
    "needed",
    [
        "oppu_http_requests_total",
        "oppu_http_request_seconds_bucket",
        "oppu_generated_tokens_total",
        "vllm:num_requests_waiting",
        "oppu_batch_size_bucket",
        "vllm:lora_adapter_loaded",
        "oppu_adapter_cache_events_total",
        "oppu_jobs",
    ],
)
def test_the_dashboard_covers(needed: str) -> None:
    assert any(needed in metric_names(expr) for _, expr in queries()), needed


# Read from the shared database or the shared job queue: every replica exports the same cluster-wide value.
CLUSTER_WIDE = frozenset({"oppu_jobs", "oppu_job_queue_depth", "oppu_stale_adapters", "oppu_job_duration_seconds_avg"})


def test_cluster_wide_series_are_not_summed_over_replicas() -> None:
    """`sum(oppu_job_queue_depth)` showed twice the queue with two API replicas."""
    for title, expr in queries():
        for name in CLUSTER_WIDE & metric_names(expr):
            assert re.search(rf"\b(max|min|avg)(\s+by\s*\([^)]*\))?\s*\(\s*{name}\b", expr), (title, expr)


def test_rate_windows_follow_the_scrape_interval() -> None:
    """A fixed [1m] window is empty at Prometheus's default 1 m scrape interval."""
    for title, expr in queries():
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval" or (window.endswith("m") and int(window[:-1]) >= 5), (title, expr)
