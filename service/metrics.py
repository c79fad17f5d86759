"""Prometheus metrics: one registry per app (tests build many apps), the HTTP middleware that counts
requests by route template, a collector that reads job / adapter state from SQL at scrape time, and the
field's series (vLLM's names, which llm-d's Router and vLLM's router read) beside our oppu_* ones.
It reads the engine through EngineStats and the adapter cache through its residency list; it never knows
which engine runs, and never puts a storage key or path in a label (adapters are named `user:<user id>`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.accounts import repository as account_repo
from service.adapters import repository as adapter_repo
from service.engine.types import EngineStats, StepInfo
from service.jobs import repository as job_repo

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from service.adapters.cache import Resident

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SWAP_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("oppu_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "oppu_http_request_seconds", "HTTP latency", ["route", "method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "oppu_batch_size", "rows per generation batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.tokens = Counter("oppu_generated_tokens", "tokens generated", registry=r)
        self.cache_events = Counter(
            "oppu_adapter_cache_events", "adapter cache hits/misses/evictions/loads", ["event", "tier"], registry=r
        )
        self.swap_seconds = Histogram(
            "oppu_adapter_swap_seconds", "adapter load latency into a tier", ["tier"], buckets=SWAP_BUCKETS, registry=r
        )
        self.slots_in_use = Gauge("oppu_adapter_slots_in_use", "device slots holding an adapter", registry=r)
        self.pinned = Gauge("oppu_adapter_slots_pinned", "slots pinned by in-flight batches", registry=r)
        self.queue_depth = Gauge("oppu_generate_queue_depth", "generate requests waiting", registry=r)
        self.rejected = Counter("oppu_rejected_requests", "requests refused by backpressure", ["reason"], registry=r)

    def on_step(self, step: StepInfo) -> None:
        self.batch_size.observe(step.running)
        self.tokens.inc(step.generated)

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def on_cache_event(self, event: str, tier: str, seconds: float) -> None:
        self.cache_events.labels(event, tier).inc()
        if event == "load":
            self.swap_seconds.labels(tier).observe(seconds)

    def render(self, engine: EngineStats) -> bytes:
        self.slots_in_use.set(engine.slots_in_use)
        self.pinned.set(engine.slots_pinned)
        self.queue_depth.set(engine.waiting)
        return generate_latest(self.registry)


class JobQueueCollector(Collector):
    """The job queue's depth at scrape time, and whether its broker answered: with Redis down the scrape
    still serves every other series (it was a 500, and the router lost the vLLM series it scores on)."""

    def __init__(self, depth: Callable[[], int | None]) -> None:
        self._depth = depth

    def collect(self) -> Iterator[Metric]:
        depth = self._depth()
        up = GaugeMetricFamily("oppu_job_queue_up", "1 if this scrape could read the job queue's depth")
        up.add_metric([], 0 if depth is None else 1)
        yield up
        if depth is not None:
            yield GaugeMetricFamily("oppu_job_queue_depth", "training jobs waiting in the queue", value=depth)


class SqlStateCollector(Collector):
    """Jobs by status, job durations by outcome, and user adapters trained on an old shared LoRA."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("oppu_jobs", "training jobs by status", labels=["status"])
        durations = GaugeMetricFamily(
            "oppu_job_duration_seconds_avg", "mean job duration by outcome", labels=["outcome"]
        )
        stale = GaugeMetricFamily("oppu_stale_adapters", "current user adapters trained on another shared LoRA")
        up = GaugeMetricFamily("oppu_metrics_sql_up", "1 if this scrape could read the SQL-backed series")
        try:
            with self._factory() as session:
                for status, n in job_repo.count_by_status(session).items():
                    jobs.add_metric([status], n)
                for outcome, mean in job_repo.mean_durations(session).items():
                    durations.add_metric([outcome], mean)
                stale.add_metric([], adapter_repo.count_stale_current(session))
        except (SQLAlchemyError, OSError) as exc:
            # The database is down: the other series (engine, HTTP, vLLM's) are what an operator needs most now.
            log.warning("metrics: SQL-backed series skipped: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield jobs
        yield durations
        yield stale


USER_MODEL_PREFIX = "user:"  # the `model` name a router sees for a user's own adapter
NAME_MEMO_MAX = 10_000  # storage key -> adapter name memo; cleared when full (names are re-read from SQL)


class FieldCollector(Collector):
    """vLLM's series with vLLM's semantics, read at scrape time: running = rows in the engine's batch, waiting =
    admitted but not running, KV usage as a fraction (0..1, as vLLM), `vllm:lora_requests_info` whose value is
    the scrape's timestamp (the inference extension's model-server protocol: the newest sample is current),
    and residency from the adapter cache (level gpu = device slots, cpu = host RAM). Label sets stay bounded:
    one series per resident adapter and tier (slots + host tier), none for adapters on disk only."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        residency: Callable[[], Sequence[Resident]] | None,
        factory: sessionmaker[Session],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stats, self._residency, self._factory, self._clock = stats, residency, factory, clock
        self._names: dict[str, str] = {}  # a user's storage key never changes: memoise its adapter name

    def _adapter_names(self, owner_keys: set[str]) -> dict[str, str]:
        """`user:<id>` per storage key; keys with no user (the shared LoRA, an erased user) have no name."""
        unknown = owner_keys - self._names.keys()
        if unknown:
            if len(self._names) + len(unknown) > NAME_MEMO_MAX:
                self._names.clear()
            try:
                with self._factory() as session:
                    for key in unknown:
                        user_id = account_repo.user_id_by_storage_key(session, key)
                        if user_id is not None:
                            self._names[key] = USER_MODEL_PREFIX + user_id
            except (SQLAlchemyError, OSError) as exc:  # database down: the names known so far
                log.warning("metrics: adapter names not read: %r", exc)
        names = {k: self._names.get(k) for k in owner_keys}  # .get: a concurrent scrape may clear the memo
        return {k: v for k, v in names.items() if v is not None}

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("vllm:num_requests_waiting", "requests admitted, not yet running", stats.waiting)
        yield GaugeMetricFamily("vllm:num_requests_running", "requests in the engine's batch", stats.running)
        lanes, free = stats.extra.get("kv_lanes"), stats.extra.get("kv_lanes_free")
        if lanes and free is not None:  # an engine that does not report its KV memory gets no series
            yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", (lanes - free) / lanes)
        residents = list(self._residency()) if self._residency is not None else []
        names = self._adapter_names({r.key.owner_key for r in residents})
        # One series per (adapter, level): two versions of one adapter in one tier are one name to a router.
        loaded: dict[tuple[str, str], tuple[bool, int]] = {}
        for r in residents:
            name = names.get(r.key.owner_key)
            if name is not None:
                level = "gpu" if r.tier == "slot" else "cpu"
                pinned, rank = loaded.get((name, level), (False, 0))
                loaded[(name, level)] = (pinned or r.pinned, max(rank, r.rank))
        family = GaugeMetricFamily(
            "vllm:lora_adapter_loaded",
            "1 per adapter resident in a tier (gpu = device slots, cpu = host RAM)",
            labels=["adapter_name", "level", "pinned", "rank"],
        )
        for (name, level), (pinned, rank) in sorted(loaded.items()):
            family.add_metric([name, level, str(pinned).lower(), str(rank)], 1)
        yield family
        in_slots = sum(1 for level in (lv for _, lv in loaded) if level == "gpu")
        yield GaugeMetricFamily("vllm:num_gpu_loaded_lora_adapters", "adapters in device slots", in_slots)
        yield GaugeMetricFamily("vllm:max_gpu_lora_adapters", "device adapter slots", stats.adapter_slots)
        rows = self._adapter_names(set(stats.running_adapters | stats.waiting_adapters))
        running = sorted({rows[k] for k in stats.running_adapters if k in rows})
        waiting = sorted({rows[k] for k in stats.waiting_adapters if k in rows})
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "running/waiting LoRA adapters (value: the time of this sample)",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric([str(stats.adapter_slots), ",".join(running), ",".join(waiting)], self._clock())
        yield info


CLIENT_CLOSED = 499  # the status a request gets in the metrics when its client left before the answer started


class HttpMetrics:
    """Counts every request by its route template (never the raw path: user ids stay out of labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, started = [500], [False]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = int(message["status"]), True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # The client left before an answer started (middleware.CancelOnDisconnect ended the handler):
            # nginx's 499, not a server error on the 5xx panels.
            if status[0] == 500 and not started[0]:
                status[0] = CLIENT_CLOSED
            raise
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            # Label values come from a fixed set: an invented method must not grow /metrics without bound.
            method = str(scope.get("method", ""))
            method = method if method in HTTP_METHODS else "other"
            status[0] = status[0] if 100 <= status[0] <= 599 else 500
            self.metrics.requests.labels(template, method, str(status[0])).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)
