"""Streams in flight per API key, so that revoking a key ends its streams at once (on every replica, through
the revoked-keys notice), not when they finish on their own. Per process; knows nothing of HTTP or models."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from service.errors import Unauthorized

T = TypeVar("T")
REVOCATION_POLL_S = 0.2  # how soon a revoked key's stream ends while it waits for its next token


class KeyRevoked(Unauthorized):
    """The key a stream was started with was revoked or rotated meanwhile."""

    code = "key_revoked"


REMEMBERED_REVOKED_MAX = 65_536  # revoked key hashes kept for late watchers (oldest dropped first)


class StreamRegistry:
    """`remember_s`: how long a revoked key is remembered, so that a stream whose request was authenticated
    before the revocation but starts watching after it (it waited at the preparation gate, or prepared) ends at
    once instead of running to its end on a dead key: at least the longest a request lives (its deadline)."""

    def __init__(self, remember_s: float = 600.0) -> None:
        self._lock = threading.Lock()
        self._live: defaultdict[str, set[threading.Event]] = defaultdict(set)
        self._remember_s = remember_s
        self._revoked: OrderedDict[str, float] = OrderedDict()  # key hash -> when revoked (monotonic), oldest first

    @contextmanager
    def watch(self, key_hash: str | None) -> Iterator[threading.Event]:
        """An event set when `key_hash` is revoked, for as long as the stream lives (admin streams: never); set
        at once if it was revoked already."""
        revoked = threading.Event()
        if key_hash is None:
            yield revoked
            return
        with self._lock:
            self._live[key_hash].add(revoked)
            self._forget_old(time.monotonic())
            if key_hash in self._revoked:
                revoked.set()
        try:
            yield revoked
        finally:
            with self._lock:
                self._live[key_hash].discard(revoked)
                if not self._live[key_hash]:
                    del self._live[key_hash]

    def revoke(self, key_hashes: Iterable[str]) -> int:
        """End the streams of these keys (and of those that start watching them later); returns how many were
        live here."""
        hashes = list(key_hashes)
        now = time.monotonic()
        with self._lock:
            for key_hash in hashes:
                self._revoked[key_hash] = now
                self._revoked.move_to_end(key_hash)
            self._forget_old(now)
            events = [e for h in hashes for e in self._live.get(h, ())]
        for event in events:
            event.set()
        return len(events)

    def _forget_old(self, now: float) -> None:
        while self._revoked and (
            len(self._revoked) > REMEMBERED_REVOKED_MAX or next(iter(self._revoked.values())) < now - self._remember_s
        ):
            self._revoked.popitem(last=False)

    async def guard(self, key_hash: str | None, parts: AsyncIterator[T]) -> AsyncIterator[T]:
        """The items of one stream until its key is revoked, then KeyRevoked (each SSE format reports it
        in-band). Checked while waiting too, so a stream stalled in a queue ends as well. Leaving closes
        `parts`, which cancels the engine rows behind it."""
        with self.watch(key_hash) as revoked:
            pending: asyncio.Future[T] | None = None
            try:
                while True:
                    pending = asyncio.ensure_future(anext(parts))
                    while not pending.done() and not revoked.is_set():
                        await asyncio.wait({pending}, timeout=REVOCATION_POLL_S)
                    if revoked.is_set():
                        pending.cancel()
                        raise KeyRevoked("the API key was revoked")
                    try:
                        item = pending.result()
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                if pending is not None and not pending.done():  # left mid-wait (the client went away)
                    pending.cancel()  # the item being fetched: `parts` cannot be closed while it runs
                    await asyncio.wait({pending})
                await _close(parts)


async def _close(parts: AsyncIterator[T]) -> None:
    close = getattr(parts, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await close()
