"""Builds the app state (DB engine, model runtime, caches) at start-up and disposes it at shutdown."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy.engine import make_url

from service.adapters.cache import AdapterCache
from service.adapters.service import AdapterContext
from service.adapters.slots import LoraSlots
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec, ValidationLimits
from service.config import Settings
from service.db.session import make_engine, make_session_factory
from service.history.service import UserCorpus
from service.inference.loader import load_model
from service.inference.runtime import ModelRuntime
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
    return AppState(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        admin_key=resolve_admin_key(settings),
        bm25=BM25Cache[UserCorpus](settings.bm25_cache_users),
        store=AdapterStore(settings.adapters_dir),
    )


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
    state.cache = AdapterCache(slots, state.store, host_budget_bytes=settings.adapter_host_budget_bytes)
    state.adapters = AdapterContext(
        store=state.store,
        spec=spec,
        limits=ValidationLimits.from_settings(settings),
        keep_versions=settings.adapter_keep_versions,
        on_drop=state.cache.drop_owner,
    )
    state.runtime = ModelRuntime(loaded, settings, slots=slots, adapters=state.cache)
    state.runtime.start()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.oppu
    start_runtime(state)
    try:
        yield
    finally:
        if state.runtime is not None:
            state.runtime.stop()
        state.engine.dispose()
