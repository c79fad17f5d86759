"""Adapter uploads in flight: at most N at once per user and M in all (429 beyond, with Retry-After), each
spooled to a temp file as it arrives, so that a 256 MiB body never sits in memory beside its unpacked copy.
Per process: each replica bounds its own."""

from __future__ import annotations

import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import IO

from service.errors import TooManyRequests

SPOOL_IN_MEMORY = 1 << 20  # bodies up to this stay in memory; larger ones go to disk


class UploadGate:
    def __init__(self, total: int, per_user: int) -> None:
        self._total, self._per_user = total, per_user
        self._lock = threading.Lock()
        self._busy: Counter[str] = Counter()

    @contextmanager
    def slot(self, owner_key: str) -> Iterator[None]:
        with self._lock:
            if self._busy[owner_key] >= self._per_user:
                raise TooManyRequests("an adapter upload of this user is in progress", headers={"Retry-After": "5"})
            if sum(self._busy.values()) >= self._total:
                raise TooManyRequests("the server is taking other uploads; retry later", headers={"Retry-After": "5"})
            self._busy[owner_key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[owner_key] -= 1
                if not self._busy[owner_key]:
                    del self._busy[owner_key]


async def spool(chunks: AsyncIterator[bytes]) -> IO[bytes]:
    """The request body in a temp file (the body size is capped by the middleware as it arrives)."""
    out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - returned
    try:
        async for chunk in chunks:
            out.write(chunk)
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out
