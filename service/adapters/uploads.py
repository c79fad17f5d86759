"""Adapter transfers in flight, per process (each replica bounds its own):

- a gate: at most N at once per user and M in all (429 beyond, with Retry-After); one instance for uploads,
  one for downloads and exports;
- an upload body spooled to a temp file as it arrives (sealed under a key only that object holds: no
  plaintext on disk), under a deadline (a stalled body ends with 408): the
  upload gate is taken only once the body is in, so stalled bodies cannot hold it; while its body arrives a
  user has at most N uploads receiving;
- a file streamed back in chunks from disk (a download never sits in memory whole), holding its gate slot
  until it is sent or the client is gone; ended mid-way (the connection closed) once its `ended` event is set
  (the caller's key revoked: a rotation or an erase).

Knows nothing of what is transferred, of users (an opaque owner key) or of SQL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import IO

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.errors import ClientDisconnected, InsufficientStorage, RequestTimeout, TooManyRequests, is_storage_full
from service.sealing.tempfiles import SealedTempFile
from service.streams import KeyRevoked
from service.threads import run_to_its_end

CHUNK = 256 * 1024  # what a streamed file holds in memory at a time (per download)
log = logging.getLogger(__name__)


class UploadGate:
    """Transfers at once, per owner and in all. `what` names them in the 429 ("upload", "download")."""

    def __init__(self, total: int, per_user: int, what: str = "upload") -> None:
        self._total, self._per_user, self._what = total, per_user, what
        self._lock = threading.Lock()
        self._busy: Counter[str] = Counter()
        self._receiving: Counter[str] = Counter()  # upload bodies arriving: per user only (see module doc)

    def acquire(self, owner_key: str) -> Callable[[], None]:
        """Take a slot or raise 429; returns its release (idempotent), for slots that outlive a block."""
        with self._lock:
            if self._busy[owner_key] >= self._per_user:
                raise TooManyRequests(
                    f"an adapter {self._what} of this user is in progress", headers={"Retry-After": "5"}
                )
            if sum(self._busy.values()) >= self._total:
                raise TooManyRequests(
                    f"the server is taking other {self._what}s; retry later", headers={"Retry-After": "5"}
                )
            self._busy[owner_key] += 1
        return self._releaser(self._busy, owner_key)

    def _releaser(self, counter: Counter[str], owner_key: str) -> Callable[[], None]:
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                counter[owner_key] -= 1
                if not counter[owner_key]:
                    del counter[owner_key]

        return release

    @contextmanager
    def slot(self, owner_key: str) -> Iterator[None]:
        release = self.acquire(owner_key)
        try:
            yield
        finally:
            release()

    @contextmanager
    def receiving(self, owner_key: str) -> Iterator[None]:
        """While one user's upload body arrives (per user only: a stalled body blocks nobody else)."""
        with self._lock:
            if self._receiving[owner_key] >= self._per_user:
                raise TooManyRequests(
                    f"an adapter {self._what} of this user is in progress", headers={"Retry-After": "5"}
                )
            self._receiving[owner_key] += 1
        release = self._releaser(self._receiving, owner_key)
        try:
            yield
        finally:
            release()

    def in_use(self) -> int:
        with self._lock:
            return sum(self._busy.values())


async def spool(chunks: AsyncIterator[bytes], timeout_s: float | None = None) -> IO[bytes]:
    """The request body in a temp file (its size is capped by the middleware as it arrives), within
    `timeout_s` seconds in all (None: no deadline)."""
    sealed = SealedTempFile()  # on disk, sealed under a key only this object holds
    out = sealed.as_io()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in chunks:
                out.write(chunk)
        sealed.done_writing()
        out.seek(0)
    except TimeoutError:
        out.close()
        raise RequestTimeout(f"the upload body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        out.close()
        raise ClientDisconnected("the client closed the connection during the upload") from None
    except OSError as exc:
        out.close()
        if is_storage_full(exc):
            raise InsufficientStorage("no disk space left to receive the upload; retry later") from exc
        raise
    except BaseException:
        out.close()
        raise
    return out


def _close_all(file: IO[bytes], release: Callable[[], None], watching: ExitStack) -> None:
    try:
        file.close()
    finally:
        try:
            release()
        finally:
            watching.close()


class TransferEnded(Exception):
    """A file being sent whose `ended` event was set: the rest is not sent (the connection is closed)."""


class GatedFileResponse(StreamingResponse):
    """Sends a temp file in chunks, then closes it and releases its gate slot: when it is sent, when the client
    is gone (the send is cancelled), when its `ended` event is set (the rest is not sent: with its length already
    announced, the connection is closed), or, if the response is never sent at all, when it is garbage collected."""

    def __init__(
        self,
        file: IO[bytes],
        release: Callable[[], None],
        media_type: str,
        filename: str,
        *,
        ended: threading.Event | None = None,
        watching: ExitStack | None = None,
    ) -> None:
        size = file.seek(0, 2)
        headers = {"Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(size)}
        super().__init__(_chunks(file, ended or threading.Event()), media_type=media_type, headers=headers)
        self._done = weakref.finalize(self, _close_all, file, release, watching or ExitStack())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TransferEnded:
            # No in-band error fits a body whose length was announced: returning before its end makes the
            # server close the connection, so the client sees a short body, never a whole file.
            log.info("a download or export was ended mid-way: its key was revoked")
        finally:
            self._done()


def gated_file(
    gate: UploadGate,
    owner_key: str,
    write: Callable[[IO[bytes]], str],
    media_type: str = "application/zip",
    *,
    ends: AbstractContextManager[threading.Event] | None = None,
) -> GatedFileResponse:
    """Take a slot of `gate` (429 if none), let `write` fill a temp file on disk and name it, and send that file
    in chunks: a download or export costs a chunk of memory, whatever its size. `ends` (entered before the
    file is written, left once it is sent or dropped): its event, once set, ends the transfer (the caller's key
    revoked meanwhile; `StreamRegistry.watch`)."""
    release = gate.acquire(owner_key)
    watching = ExitStack()
    try:
        ended = watching.enter_context(ends or nullcontext(threading.Event()))
    except BaseException:
        release()
        raise
    sealed = SealedTempFile()  # the archive on disk is sealed under a key only this object holds
    file = sealed.as_io()
    try:
        filename = write(file)
        sealed.done_writing()
        if ended.is_set():  # revoked while the file was written: a plain 401, nothing sent
            raise KeyRevoked("the API key was revoked")
    except BaseException:
        _close_all(file, release, watching)
        raise
    return GatedFileResponse(file, release, media_type, filename, ended=ended, watching=watching)


async def _chunks(file: IO[bytes], ended: threading.Event) -> AsyncIterator[bytes]:
    await run_to_its_end(file.seek, 0)
    while chunk := await run_to_its_end(file.read, CHUNK):
        if ended.is_set():
            raise TransferEnded("the transfer was ended")
        yield chunk
