"""POST /users/{id}/generate (JSON, or Server-Sent Events with "stream": true)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.deps import RuntimeDep, StateDep, UserDep
from service.generation import service
from service.generation.schemas import GenerateIn, GenerateOut

router = APIRouter(prefix="/users/{user_id}", tags=["generate"])

SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE events when stream=true"}
}


@router.post("/generate", response_model=GenerateOut, responses=SSE_DOC)
async def generate(body: GenerateIn, user: UserDep, state: StateDep, runtime: RuntimeDep) -> Any:
    if body.stream:
        events = await service.generate_stream(state, runtime, user, body)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await service.generate(state, runtime, user, body)
