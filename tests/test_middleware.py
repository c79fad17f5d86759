"""CancelOnDisconnect at the ASGI level: a client that leaves cancels the handler (read a body or not), a
client that stays gets its whole answer, the body reaches the handler intact, and the disconnect that a
server reports after a complete response cancels nothing. InFlightLimit: requests beyond the cap get 503 (the
probes pass). BodySizeLimit's deadline: a stalled body is 408, a complete one is never cut."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from starlette.types import Message, Receive, Scope, Send

from service.middleware import BodySizeLimit, CancelOnDisconnect, InFlightLimit

SCOPE: Scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}


def _client(messages: list[Message], leave_after_s: float | None) -> tuple[Receive, Send, list[Message]]:
    """A client that sends `messages`, then leaves after `leave_after_s` (None: once answered)."""
    sent: list[Message] = []
    answered = asyncio.Event()

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        if leave_after_s is None:
            await answered.wait()
        else:
            await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()

    return receive, send, sent


def _run(app: Callable[[Scope, Receive, Send], Awaitable[None]], receive: Receive, send: Send) -> None:
    asyncio.run(asyncio.wait_for(CancelOnDisconnect(app)(SCOPE, receive, send), timeout=5))


def test_a_client_that_leaves_cancels_the_handler_even_without_reading_the_body() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await asyncio.sleep(60)  # e.g. waiting for engine rows; it never reads the body
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    receive, send, sent = _client([{"type": "http.request", "body": b"{}", "more_body": False}], 0.05)
    _run(app, receive, send)
    assert seen == ["cancelled"] and sent == []


def test_a_client_that_stays_gets_the_whole_answer_and_the_body_intact() -> None:
    done: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await asyncio.sleep(0.1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        await asyncio.sleep(0.05)  # work after the answer (metrics): the server's late disconnect must not cut it
        done.append(body)

    chunks: list[Message] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    ]
    receive, send, sent = _client(chunks, None)
    _run(app, receive, send)
    assert done == [b"abcd"] and sent[-1]["body"] == b"abcd"


def test_a_streaming_handler_is_cancelled_when_the_client_leaves_mid_stream() -> None:
    chunks_sent: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(1000):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            chunks_sent.append(i)
            await asyncio.sleep(0.01)

    receive, send, _ = _client([{"type": "http.request", "body": b"", "more_body": False}], 0.1)
    _run(app, receive, send)
    assert 0 < len(chunks_sent) < 100


def test_requests_beyond_the_in_flight_limit_get_503_and_a_finished_one_frees_its_place() -> None:
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = InFlightLimit(app, max_requests=2)

    async def call() -> list[Message]:
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        await limited(SCOPE, receive, send)
        return sent

    async def scenario() -> None:
        held = [asyncio.ensure_future(call()) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await asyncio.wait_for(call(), timeout=1)  # answered at once, not queued
        assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
        assert json.loads(refused[1]["body"])["code"] == "unavailable"
        release.set()
        assert [m[0]["status"] for m in await asyncio.gather(*held)] == [200, 200]
        assert limited.in_flight == 0
        assert (await call())[0]["status"] == 200

    asyncio.run(scenario())


def test_the_probes_are_never_capped() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    full = InFlightLimit(app, max_requests=0)  # as a saturated replica: every request slot taken

    async def status(path: str) -> int:
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        await full({**SCOPE, "method": "GET", "path": path}, receive, send)
        return int(sent[0]["status"])

    statuses = {
        path: asyncio.run(status(path)) for path in ("/healthz", "/readyz", "/health", "/metrics", "/users/a/history")
    }
    assert statuses == {"/healthz": 200, "/readyz": 200, "/health": 200, "/metrics": 200, "/users/a/history": 503}


def _reading_app(read_after_body: bool) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Reads the whole body (then, with read_after_body, waits for the disconnect as a stream does), answers."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (message := await receive())["type"] == "http.request" and message.get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": read_after_body})
        if read_after_body:
            assert (await receive())["type"] == "http.disconnect"
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def test_a_body_that_stalls_past_its_deadline_is_408_and_a_complete_one_is_never_cut() -> None:
    async def call(app: Callable[[Scope, Receive, Send], Awaitable[None]], stall_s: float) -> list[Message]:
        sent: list[Message] = []
        parts: list[Message] = [{"type": "http.request", "body": b"{", "more_body": True}]

        async def receive() -> Message:
            if parts:
                return parts.pop(0)
            await asyncio.sleep(stall_s)  # the rest of the body never comes (or, once it did: the disconnect)
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        limited = BodySizeLimit(app, max_bytes=1024, upload_max_bytes=1024, timeout_s=0.1, upload_timeout_s=0.1)
        await asyncio.wait_for(limited(SCOPE, receive, send), timeout=5)
        return sent

    stalled = asyncio.run(call(_reading_app(False), stall_s=30))
    assert stalled[0]["status"] == 408 and json.loads(stalled[1]["body"])["code"] == "request_timeout"

    async def complete_then_wait() -> list[Message]:
        sent: list[Message] = []
        parts: list[Message] = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> Message:
            if parts:
                return parts.pop(0)
            await asyncio.sleep(0.3)  # past the body deadline: the client listens to a long stream
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        limited = BodySizeLimit(
            _reading_app(True), max_bytes=1024, upload_max_bytes=1024, timeout_s=0.1, upload_timeout_s=0.1
        )
        await limited(SCOPE, receive, send)
        return sent

    answered = asyncio.run(complete_then_wait())
    assert answered[0]["status"] == 200
    assert answered[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_streamed_responses_leave_no_pending_helper_tasks() -> None:
    # Starlette cancels its disconnect listener (our receive) when every stream ends: the receive's two helper
    # tasks were left pending (two per streamed response, "Task was destroyed but it is pending!" at GC).
    from collections.abc import AsyncIterator

    from starlette.responses import StreamingResponse

    async def body() -> AsyncIterator[str]:
        for i in range(3):
            yield f"data: {i}\n\n"
            await asyncio.sleep(0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(body(), media_type="text/event-stream")(scope, receive, send)

    wrapped = CancelOnDisconnect(app)

    async def one() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST", "path": "/x"}
        scope["headers"] = []
        sent: list[Message] = []
        first, closed = True, asyncio.Event()

        async def receive() -> Message:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"", "more_body": False}
            await closed.wait()  # the server: nothing more until the connection closes
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        await wrapped(scope, receive, send)
        assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}

    async def main() -> int:
        before = len(asyncio.all_tasks())
        for _ in range(20):
            await one()
        await asyncio.sleep(0.05)
        return len(asyncio.all_tasks()) - before

    assert asyncio.run(main()) == 0


def test_a_client_that_leaves_is_noticed_when_the_handler_ignores_a_body_in_two_parts() -> None:
    # The pump held one unread message: a route that never reads its body (POST .../profile/generate) with a
    # chunked body blocked it on the second part, the disconnect behind it was never read, the row ran on.
    async def main() -> bool:
        cancelled = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        messages: list[Message] = [
            {"type": "http.request", "body": b"{", "more_body": True},
            {"type": "http.request", "body": b"}", "more_body": False},
            {"type": "http.disconnect"},
        ]

        async def receive() -> Message:
            await asyncio.sleep(0.01)
            if messages:
                return messages.pop(0)
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            pass

        task = asyncio.ensure_future(CancelOnDisconnect(app)({"type": "http"}, receive, send))
        try:
            await asyncio.wait_for(cancelled.wait(), 1.0)
            return True
        except TimeoutError:
            return False
        finally:
            task.cancel()

    assert asyncio.run(main()), "the client left but the handler was not cancelled"


def test_a_large_unread_body_is_not_read_ahead_past_the_pump_buffer() -> None:
    from service.middleware import PUMP_BUFFER_BYTES

    async def main() -> int:
        calls = 0
        chunk = b"x" * (PUMP_BUFFER_BYTES // 2)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await asyncio.sleep(0.2)  # never reads its body

        async def receive() -> Message:
            nonlocal calls
            calls += 1
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: Message) -> None:
            pass

        await CancelOnDisconnect(app)({"type": "http"}, receive, send)
        return calls

    assert asyncio.run(main()) <= 3  # two chunks fill the buffer, the third waits for the handler


def test_a_server_that_repeats_the_last_body_part_is_not_read_ahead_without_end() -> None:
    # A receive that answers the request again and again (some ASGI test doubles) filled the read-ahead
    # without bound (empty bodies count 0 bytes): 19 GB in one test before the OOM killer.
    async def main() -> int:
        calls = 0

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            assert (await receive())["type"] == "http.request"
            await asyncio.sleep(0.1)

        async def receive() -> Message:
            nonlocal calls
            calls += 1
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            pass

        await CancelOnDisconnect(app)({"type": "http"}, receive, send)
        return calls

    assert asyncio.run(main()) <= 2
