"""ASGI middleware: the cap on requests in flight (503 beyond), the request body's size cap (413 before the body
is parsed) and deadline (408), read whole before its request counts in flight, and the end of every request
whose client went away (its engine rows are cancelled)."""

from __future__ import annotations

import asyncio
from collections import Counter, deque

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body, for_path

# Cheap routes that a saturated replica must still answer (liveness and readiness probes, the scrape).
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/health", "/metrics"})  # /health: vllm-router's probe


class InFlightLimit:
    """At most `max_requests` HTTP requests in the app at once; the next one is answered 503 with Retry-After
    at once. Counted here, not by uvicorn's limit_concurrency, which counts open connections: 256 idle sockets
    that never sent a byte (uvicorn has no header timeout) made it answer 503 to everyone, unauthenticated."""

    def __init__(self, app: ASGIApp, max_requests: int, exempt_paths: frozenset[str] = PROBE_PATHS) -> None:
        self.app = app
        self.max_requests = max_requests
        self.exempt_paths = exempt_paths
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_requests:
            busy = error_body("unavailable", "the server is at its request limit; retry later")
            await _answer(send, 503, for_path(scope.get("path", ""), 503, busy), retry_after=1)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyTooLarge(HTTPException):
    """Raised by receive() once a body (chunked, or longer than declared) passes the cap. An HTTPException
    so that FastAPI re-raises it from body parsing (other errors there become 400) and the JSON handler
    answers 413."""

    def __init__(self) -> None:
        super().__init__(413, "request body is too large")


class BodyTimedOut(HTTPException):
    """Raised by receive() once a body has not arrived within its deadline (as BodyTooLarge: FastAPI re-raises
    it from body parsing, the JSON handler answers 408)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s")


class BodySizeLimit:
    """Caps every request body at max_bytes within timeout_s, except adapter uploads (PUT .../adapter), capped
    at upload_max_bytes within upload_timeout_s. The deadline runs from the request's start until its body is
    complete; reads after that (a stream listening for the disconnect) wait as long as they like.

    Placed outside InFlightLimit, it reads every body but an upload's whole before the app sees the request: a
    body still arriving holds no request place (before, 256 clients with no key, each sending `{` and waiting,
    made a replica answer 503 to every tenant for the body deadline). Bodies arriving at once are capped per
    client address (`max_receiving_per_client`, 429) and in all (`max_receiving`, 503). An upload streams into
    its route, which authenticates first and caps its owner's bodies arriving (`adapters/uploads.py`)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        upload_max_bytes: int,
        timeout_s: float,
        upload_timeout_s: float,
        max_receiving: int = 1024,
        max_receiving_per_client: int = 64,
    ) -> None:
        self.app = app
        self.default_max = max_bytes
        self.upload_max = upload_max_bytes
        self.timeout_s = timeout_s
        self.upload_timeout_s = upload_timeout_s
        self.max_receiving, self.max_receiving_per_client = max_receiving, max_receiving_per_client
        self.receiving: Counter[str] = Counter()  # bodies being read whole, per client address (one event loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope.get("method") == "PUT" and str(scope.get("path", "")).endswith("/adapter")
        max_bytes = self.upload_max if is_upload else self.default_max
        timeout_s = self.upload_timeout_s if is_upload else self.timeout_s
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await _reject(send, scope.get("path", ""))
            return
        body = _CappedBody(receive, max_bytes, timeout_s)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        has_body = (declared is not None and declared != b"0") or b"transfer-encoding" in headers
        try:
            if has_body and not is_upload:
                await self._whole_body_first(scope, body, tracking_send)
            else:
                await self.app(scope, body.receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _reject(send, scope.get("path", ""))
        except BodyTimedOut as exc:
            if not started:
                timed_out = error_body("request_timeout", str(exc.detail))
                await _answer(send, 408, for_path(scope.get("path", ""), 408, timed_out))

    async def _whole_body_first(self, scope: Scope, body: _CappedBody, send: Send) -> None:
        client = str((scope.get("client") or ("",))[0])
        path = str(scope.get("path", ""))
        if self.receiving[client] >= self.max_receiving_per_client:
            busy = error_body("too_many_requests", "too many request bodies arriving from this client; retry later")
            await _answer(send, 429, for_path(path, 429, busy), retry_after=1)
            return
        if self.receiving.total() >= self.max_receiving:
            busy = error_body("unavailable", "the server is receiving too many request bodies; retry later")
            await _answer(send, 503, for_path(path, 503, busy), retry_after=1)
            return
        self.receiving[client] += 1
        try:
            first = await body.read_whole()
        finally:
            self.receiving[client] -= 1
            if not self.receiving[client]:
                del self.receiving[client]
        if first["type"] == "http.disconnect":
            return  # the client left mid-body: nobody to answer
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await body.receive()
            replayed = True
            return first

        await self.app(scope, replay, send)


class _CappedBody:
    """A request's body under its size cap and deadline: `receive` as the app would call it, or `read_whole`."""

    def __init__(self, receive: Receive, max_bytes: int, timeout_s: float) -> None:
        self._receive, self.max_bytes, self.timeout_s = receive, max_bytes, timeout_s
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout_s
        self._seen, self._complete = 0, False

    async def receive(self) -> Message:
        if self._complete:
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self._deadline - self._loop.time()))
        except TimeoutError:
            raise BodyTimedOut(self.timeout_s) from None
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self.max_bytes:
                raise BodyTooLarge()
        self._complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    async def read_whole(self) -> Message:
        """The whole body as one message (or the disconnect that came before its end)."""
        parts: list[bytes] = []
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                return message
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}


async def _reject(send: Send, path: str) -> None:
    await _answer(send, 413, for_path(path, 413, error_body("payload_too_large", "request body is too large")))


async def _answer(send: Send, status: int, error: dict[str, object], retry_after: int | None = None) -> None:
    import json

    body = json.dumps(error).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


PUMP_BUFFER_BYTES = 64 * 1024  # body read ahead of a handler that has not asked for it (CancelOnDisconnect)


class _ReadAhead:
    """The connection's messages read ahead of the handler (CancelOnDisconnect's pump), up to PUMP_BUFFER_BYTES
    of body, and handed to it in order; `gone` once the server reports the disconnect."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._inbox: deque[Message] = deque()
        self._buffered = 0  # body bytes in the inbox
        self._arrived, self._taken, self.gone = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def pump(self) -> None:
        complete = False  # the body's last part arrived: the server's next message is the disconnect
        while (message := await self._receive())["type"] != "http.disconnect":
            if complete:  # more after the last part (a test double repeating it): not read ahead, parked
                await asyncio.Event().wait()
            complete = not message.get("more_body", False)
            self._inbox.append(message)
            self._buffered += len(message.get("body", b""))
            self._arrived.set()
            while self._buffered > PUMP_BUFFER_BYTES:  # back-pressure beyond a small body the handler never read
                self._taken.clear()
                await self._taken.wait()
        self.gone.set()

    async def receive(self) -> Message:
        while not self._inbox:
            if self.gone.is_set():
                return {"type": "http.disconnect"}
            self._arrived.clear()
            waits = [asyncio.ensure_future(self._arrived.wait()), asyncio.ensure_future(self.gone.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the caller is cancelled here (Starlette's disconnect listener after a stream)
                for waiting in waits:
                    waiting.cancel()
        message = self._inbox.popleft()
        self._buffered -= len(message.get("body", b""))
        self._taken.set()
        return message


class CancelOnDisconnect:
    """Every HTTP request's handler is cancelled the moment its client disconnects, whatever the route and
    whether it streams or not: awaiting an engine stream then closes it, which cancels its rows (their KV
    lanes, adapter pins and queue share are freed before the next step). One rule for every route, so a new
    generating route cannot forget it (tests/api/test_cancel_on_disconnect.py holds the route matrix).

    It owns the connection's `receive`: a pump reads the server's messages ahead of the handler, up to
    PUMP_BUFFER_BYTES of body (beyond that, only as the handler takes them: a large body still streams with
    back-pressure), and so notices the disconnect even when the handler never reads a small body, in however
    many parts it came; the handler's own receive calls are answered from it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbox = _ReadAhead(receive)

        answered = False  # the whole response was sent: the server then reports a disconnect too

        async def app_send(message: Message) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        handler = asyncio.ensure_future(self.app(scope, inbox.receive, app_send))
        watcher = asyncio.ensure_future(inbox.pump())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and not answered:  # the client left first: nobody will read the answer
                handler.cancel()
                await asyncio.wait({handler})
                return
            await handler  # the handler's own error goes on up
        finally:
            watcher.cancel()
            if not handler.done():
                handler.cancel()
