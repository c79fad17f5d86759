"""The route class of every API router: a plain `def` endpoint runs in a worker thread that its request waits
out (service.threads), never FastAPI's own threadpool call, which a cancelled request (its client left)
abandons while the endpoint still uses the request's session."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute

from service.threads import run_to_its_end


class WholeThreadRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _waited_out(endpoint)
        super().__init__(path, endpoint, **kwargs)


def _waited_out(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)  # FastAPI reads the signature and annotations through __wrapped__
    async def waited_out(*args: Any, **kwargs: Any) -> Any:
        return await run_to_its_end(endpoint, *args, **kwargs)

    return waited_out
