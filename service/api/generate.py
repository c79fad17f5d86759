"""POST /users/{id}/generate (JSON, or Server-Sent Events with "stream": true) and POST /users/{id}/score.
A client that leaves cancels its rows (`middleware.CancelOnDisconnect`, for every route)."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api.routing import WholeThreadRoute
from service.deps import CallerDep, PreparerDep, StreamsDep, UserDep
from service.errors import AUTH_ERRORS, SERVING_ERRORS, error_responses
from service.generation import service
from service.generation.schemas import GenerateIn, GenerateOut, ScoreIn, ScoreOut

router = APIRouter(
    route_class=WholeThreadRoute,
    prefix="/users/{user_id}",
    tags=["generate"],
    responses=error_responses(*AUTH_ERRORS, *SERVING_ERRORS),
)
T = TypeVar("T")

SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE events when stream=true"}
}


@router.post("/generate", response_model=GenerateOut, responses=SSE_DOC)
async def generate(
    body: GenerateIn, user: UserDep, caller: CallerDep, preparer: PreparerDep, streams: StreamsDep
) -> Any:
    if body.stream:
        events = await service.generate_sse(preparer, user, body, streams, caller.key_hash)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await service.generate(preparer, user, body)


@router.post("/score", response_model=ScoreOut)
async def score(body: ScoreIn, user: UserDep, preparer: PreparerDep) -> ScoreOut:
    """Log-probabilities of fixed candidate answers under the user's adapter (prefill only, same engine)."""
    return await service.score(preparer, user, body)
