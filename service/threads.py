"""Work in a worker thread whose caller waits it out, even when cancelled.

Every request's handler is cancelled when its client leaves (middleware.CancelOnDisconnect), and a plain
`run_in_threadpool` then returns at once while its thread runs on: the request's dependencies were torn down
under it (the request's database session rolled back and closed from another thread while the route still
used it: a SQLite connection closed mid-insert, others' writes waiting on its lock for 30 s, and gates such
as the per-user upload or preparation slot handed on while their work still ran). Here the caller goes only
when the thread has ended, then re-raises the cancellation.

Knows no HTTP, users or SQL: the one place that puts request work on worker threads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from starlette.concurrency import run_in_threadpool

P = ParamSpec("P")
T = TypeVar("T")


async def run_to_its_end(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` in a worker thread; a caller cancelled meanwhile waits for the thread to end (its
    result or error dropped), then re-raises CancelledError."""
    work = asyncio.ensure_future(run_in_threadpool(functools.partial(fn, *args, **kwargs)))
    cancelled = False
    while not work.done():
        try:
            await asyncio.wait({work})  # never cancels `work`
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not work.cancelled():
            work.exception()  # retrieved: nobody is left to read it
        raise asyncio.CancelledError
    return work.result()
