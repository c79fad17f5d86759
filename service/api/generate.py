"""POST /users/{id}/generate (JSON, or Server-Sent Events with "stream": true) and POST /users/{id}/score."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.deps import CallerDep, StateDep, UserDep
from service.errors import AUTH_ERRORS, SERVING_ERRORS, error_responses
from service.generation import service
from service.generation.schemas import GenerateIn, GenerateOut, ScoreIn, ScoreOut

router = APIRouter(
    prefix="/users/{user_id}", tags=["generate"], responses=error_responses(*AUTH_ERRORS, *SERVING_ERRORS)
)
T = TypeVar("T")

SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE events when stream=true"}
}


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away (its engine row and adapter pin are freed)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


@router.post("/generate", response_model=GenerateOut, responses=SSE_DOC)
async def generate(request: Request, body: GenerateIn, user: UserDep, caller: CallerDep, state: StateDep) -> Any:
    if body.stream:
        events = await service.generate_sse(state.preparer, user, body, state.streams, caller.key_hash)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await until_disconnect(request, service.generate(state.preparer, user, body))


@router.post("/score", response_model=ScoreOut)
async def score(request: Request, body: ScoreIn, user: UserDep, state: StateDep) -> ScoreOut:
    """Log-probabilities of fixed candidate answers under the user's adapter (prefill only, same engine)."""
    return await until_disconnect(request, service.score(state.preparer, user, body))
