"""Builds the app state (DB engine, model runtime, caches) at start-up and disposes it at shutdown."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from service.adapters import service as adapter_service
from service.adapters.cache import AdapterCache
from service.adapters.service import AdapterContext
from service.adapters.slots import LoraSlots
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec, ValidationLimits
from service.config import Settings
from service.db.models import SHARED_OWNER
from service.db.session import make_engine, make_session_factory, unit_of_work
from service.history.service import UserCorpus
from service.inference.loader import load_model
from service.inference.runtime import ModelRuntime
from service.jobs.queue import ADAPTER_CHANNEL, InProcessJobQueue, RedisJobQueue, make_queue
from service.jobs.tasks import JobContext, recover_in_process, run_job
from service.metrics import SqlStateCollector
from service.ratelimit import FailedAuthLimiter
from service.retrieval.bm25 import BM25Cache
from service.state import AppState

log = logging.getLogger(__name__)
ADMIN_KEY_FILE = "admin_key"


def resolve_admin_key(settings: Settings) -> str:
    """OPPU_ADMIN_KEY, else (embedded default only) a key generated once and kept in the data dir."""
    if settings.admin_key is not None and settings.admin_key.get_secret_value():
        return settings.admin_key.get_secret_value()
    if make_url(settings.resolved_database_url).get_backend_name() != "sqlite":
        raise RuntimeError("OPPU_ADMIN_KEY must be set when OPPU_DATABASE_URL is not SQLite")
    path = Path(settings.data_dir) / ADMIN_KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "oppu_admin_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    print(f"OPPU admin key (shown once, stored in {path}): {key}", flush=True)
    return key


def build_state(settings: Settings) -> AppState:
    engine = make_engine(settings.resolved_database_url)
    state = AppState(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        admin_key=resolve_admin_key(settings),
        bm25=BM25Cache[UserCorpus](settings.bm25_cache_users),
        store=AdapterStore(settings.adapters_dir),
        auth_limiter=FailedAuthLimiter(settings.auth_max_failures, settings.auth_failure_window_s),
    )
    state.metrics.registry.register(SqlStateCollector(state.session_factory))
    return state


def start_runtime(state: AppState) -> None:
    settings = state.settings
    loaded = load_model(settings)
    spec = BaseModelSpec.from_model(loaded.model, loaded.name)  # before slots wrap the Linears
    slots = LoraSlots(
        loaded.model,
        settings.adapter_slots,
        settings.adapter_max_rank,
        settings.adapter_target_modules,
        device=loaded.device,
        dtype=loaded.dtype,
    )
    metrics = state.metrics
    state.cache = AdapterCache(
        slots, state.store, host_budget_bytes=settings.adapter_host_budget_bytes, on_event=metrics.on_cache_event
    )
    state.adapters = AdapterContext(
        store=state.store,
        spec=spec,
        limits=ValidationLimits.from_settings(settings),
        keep_versions=settings.adapter_keep_versions,
        on_drop=state.cache.drop_owner,
    )

    def on_batch(rows: int, tokens: int) -> None:
        metrics.batch_size.observe(rows)
        metrics.tokens.inc(tokens)

    state.runtime = ModelRuntime(loaded, settings, slots=slots, adapters=state.cache, on_batch=on_batch)
    with unit_of_work(state.session_factory) as session:
        shared = adapter_service.current_version(session, SHARED_OWNER)
    if shared is not None:
        state.runtime.apply_shared_now(adapter_service.shared_weights(state.store, shared), shared)
    state.runtime.start()


def start_jobs(state: AppState) -> threading.Event:
    """The job queue (RQ, or the in-process runner) and the adapter-change listener."""
    settings = state.settings
    stop = threading.Event()
    holder: list[JobContext] = []
    queue = make_queue(settings, lambda job_id: run_job(holder[0], job_id))
    holder.append(JobContext(settings, state.session_factory, state.store, queue))
    state.queue = queue

    def on_adapter_change(owner_key: str, _version: int | None) -> None:
        # Correctness does not depend on this (every request reads the current version from SQL);
        # it frees the old version's slot and host memory early.
        if state.cache is not None:
            state.cache.drop_owner(owner_key)

    if isinstance(queue, InProcessJobQueue):
        queue.listeners.append(on_adapter_change)
        recover_in_process(holder[0])
    elif isinstance(queue, RedisJobQueue):
        threading.Thread(
            target=listen_adapter_changes, args=(queue, on_adapter_change, stop), name="oppu-pubsub", daemon=True
        ).start()
    return stop


def listen_adapter_changes(
    queue: RedisJobQueue, callback: Callable[[str, int | None], None], stop: threading.Event
) -> None:
    while not stop.is_set():
        try:
            pubsub = queue.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            pubsub.subscribe(ADAPTER_CHANNEL)
            while not stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message and isinstance(message.get("data"), bytes):
                    owner, _, version = message["data"].decode().partition(" ")
                    callback(owner, int(version) if version.isdigit() else None)
        except Exception:
            log.exception("adapter pub/sub listener failed; reconnecting")
            stop.wait(1.0)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.oppu
    # Each sync step of a request (deps, route, dependency exit) takes a worker thread; with fewer threads
    # than concurrent requests, requests holding the SQLite write lock can starve waiting for one.
    anyio.to_thread.current_default_thread_limiter().total_tokens = state.settings.max_concurrency + 16
    start_runtime(state)
    stop_jobs = start_jobs(state)
    try:
        yield
    finally:
        stop_jobs.set()
        if state.queue is not None:
            state.queue.close()
        if state.runtime is not None:
            state.runtime.stop()
        state.engine.dispose()
