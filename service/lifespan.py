"""The API process's lifespan: the composition root builds and starts the state; it is stopped at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from service import composition


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    # Each sync step of a request (deps, route, dependency exit) takes a worker thread; with fewer threads
    # than concurrent requests, requests holding the SQLite write lock can starve waiting for one.
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.max_concurrency + 16
    state = await anyio.to_thread.run_sync(composition.app_state, settings, app.state.metrics)
    try:  # a start that fails half-way stops what it started (threads, the job runner): the process can exit
        composition.start(state)
        app.state.oppu = state
        yield
    finally:
        composition.stop(state)
