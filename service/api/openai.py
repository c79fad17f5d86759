"""OpenAI-compatible routes: a user key serves that user's adapter (model "personal")."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api.routing import WholeThreadRoute
from service.deps import CallerDep, PreparerDep, StateDep, StreamsDep
from service.errors import AUTH_ERRORS, SERVING_ERRORS, error_responses
from service.openai_compat import service
from service.openai_compat.schemas import ChatCompletionIn, CompletionIn, ModelList

router = APIRouter(route_class=WholeThreadRoute, prefix="/v1", tags=["openai"], responses=error_responses(*AUTH_ERRORS))
SERVING = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream=true"},
    **error_responses(*SERVING_ERRORS),
}


def _respond(result: Any) -> Any:
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models", response_model=ModelList)
def models(caller: CallerDep, state: StateDep) -> ModelList:
    return service.list_models(caller, state.engine.model_name)


@router.post("/chat/completions", responses=SERVING)
async def chat_completions(
    body: ChatCompletionIn, caller: CallerDep, preparer: PreparerDep, streams: StreamsDep
) -> Any:
    return _respond(await service.chat(preparer, streams, caller, body))


@router.post("/completions", responses=SERVING)
async def completions(body: CompletionIn, caller: CallerDep, preparer: PreparerDep, streams: StreamsDep) -> Any:
    return _respond(await service.complete(preparer, streams, caller, body))
