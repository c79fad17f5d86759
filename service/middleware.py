"""ASGI middleware: request body size cap (413 before the body is parsed)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body


class BodyTooLarge(HTTPException):
    """Raised by receive() once a body (chunked, or longer than declared) passes the cap. An HTTPException
    so that FastAPI re-raises it from body parsing (other errors there become 400) and the JSON handler
    answers 413."""

    def __init__(self) -> None:
        super().__init__(413, "request body is too large")


class BodySizeLimit:
    """Caps every request body at max_bytes, except adapter uploads (PUT .../adapter), capped at
    upload_max_bytes."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int) -> None:
        self.app = app
        self.default_max = max_bytes
        self.upload_max = upload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope.get("method") == "PUT" and str(scope.get("path", "")).endswith("/adapter")
        max_bytes = self.upload_max if is_upload else self.default_max
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await _reject(send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _reject(send)


async def _reject(send: Send) -> None:
    import json

    body = json.dumps(error_body("payload_too_large", "request body is too large")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
