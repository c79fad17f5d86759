"""Maps OpenAI requests onto the personal pipeline: `model` picks the adapter ("personal" = the
caller's own, the base name = none, `user:<id>` for admins), the last user turn is augmented with the
user's retrieved history and profile by the one prompt builder, and generation runs in mixed batches."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.db.session import unit_of_work
from service.errors import NotFound, Unprocessable
from service.generation import service as generation
from service.generation.schemas import GenerateIn
from service.inference.runtime import Completion, ModelRuntime
from service.openai_compat.schemas import ChatCompletionIn, CommonParams, CompletionIn, ModelCard, ModelList, Usage
from service.state import AppState
from service.tenancy import Caller, UserRef, authorize_user

PERSONAL = "personal"
DEFAULT_RETRIEVAL_K = 3


def list_models(caller: Caller, base_name: str) -> ModelList:
    cards = [ModelCard(id=base_name)]
    if not caller.is_admin:
        cards.insert(0, ModelCard(id=PERSONAL))
    return ModelList(data=cards)


def resolve_target(session: Session, caller: Caller, model: str, base_name: str) -> tuple[UserRef | None, bool]:
    """(the user whose history/adapter personalise the answer, whether to use the adapter)."""
    if model == PERSONAL and not caller.is_admin and caller.user_id is not None:
        return authorize_user(session, caller, caller.user_id), True
    if model.startswith("user:") and caller.is_admin:
        return authorize_user(session, caller, model.removeprefix("user:")), True
    if model == base_name:
        if caller.user_id is not None:
            return authorize_user(session, caller, caller.user_id), False
        return None, False
    raise NotFound(f"model {model!r} does not exist; see GET /v1/models")


def _max_new(body: CommonParams, state: AppState) -> int:
    n = body.max_completion_tokens or body.max_tokens or state.settings.default_max_new_tokens
    if n > state.settings.max_new_tokens_cap:
        raise Unprocessable(f"max_tokens must be <= {state.settings.max_new_tokens_cap}")
    return n


async def _prepare(
    state: AppState, caller: Caller, body: CommonParams, query: str
) -> tuple[generation.PreparedRequest | None, str]:
    runtime = state.runtime
    base_name = runtime.model_name if runtime is not None else ""

    def run() -> tuple[generation.PreparedRequest | None, str]:
        with unit_of_work(state.session_factory) as session:
            user, use_adapter = resolve_target(session, caller, body.model, base_name)
            if user is None:
                return None, query
            k = body.retrieval_k if body.retrieval_k is not None else (DEFAULT_RETRIEVAL_K if use_adapter else 0)
            try:
                request = GenerateIn(
                    prompt=query or " ",
                    retrieval_k=k,
                    use_profile=body.use_profile if body.use_profile is not None else use_adapter,
                    use_adapter=use_adapter,
                )
            except ValidationError as exc:
                raise Unprocessable("invalid request: " + str(exc.errors()[0].get("msg", ""))) from exc
            prepared = generation.prepare(session, state, user, request)
        if prepared.adapter is not None and state.cache is not None:
            state.cache.prefetch(prepared.adapter)
        return prepared, prepared.text

    return await run_in_threadpool(run)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(done: Completion) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=len(done.token_ids),
        total_tokens=done.prompt_tokens + len(done.token_ids),
    )


async def chat(state: AppState, runtime: ModelRuntime, caller: Caller, body: ChatCompletionIn) -> Any:
    max_new = _max_new(body, state)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    query = messages[last_user]["content"] if last_user is not None else ""
    prepared, augmented = await _prepare(state, caller, body, query)
    if last_user is not None:
        messages[last_user] = {"role": "user", "content": augmented}
    ids = runtime.encode_chat(messages, max_new)
    return await _run(runtime, body, prepared, ids, max_new, chat=True, tenant=caller.user_id)


async def complete(state: AppState, runtime: ModelRuntime, caller: Caller, body: CompletionIn) -> Any:
    max_new = _max_new(body, state)
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    prepared, _ = await _prepare(state, caller, body, text)  # raw completion: no retrieval in the text
    ids = runtime.encode_raw(text, max_new)
    return await _run(runtime, body, prepared, ids, max_new, chat=False, tenant=caller.user_id)


async def _run(
    runtime: ModelRuntime,
    body: CommonParams,
    prepared: generation.PreparedRequest | None,
    ids: list[int],
    max_new: int,
    *,
    chat: bool,
    tenant: str | None,
) -> Any:
    params = runtime.params(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    adapter = prepared.adapter if prepared is not None else None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(
            runtime,
            ids,
            params,
            adapter,
            rid,
            created,
            body.model,
            chat=chat,
            include_usage=include_usage,
            tenant=tenant,
        )
    done = await runtime.complete(ids, params, adapter, tenant=tenant)
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(done.finish_reason), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": done.text}
    else:
        choice["text"] = done.text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": body.model,
        "choices": [choice],
        "usage": _usage(done).model_dump(),
    }


async def _stream(
    runtime: ModelRuntime,
    ids: list[int],
    params: Any,
    adapter: Any,
    rid: str,
    created: int,
    model: str,
    *,
    chat: bool,
    include_usage: bool,
    tenant: str | None,
) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": delta} if delta else {})
        else:
            choice["text"] = delta or ""
        payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk("", None, first=True)
    async for part in runtime.stream(ids, params, adapter, tenant=tenant):
        if isinstance(part, Completion):
            yield chunk(None, _finish(part.finish_reason))
            if include_usage:
                usage = {"id": rid, "object": kind, "created": created, "model": model, "choices": []}
                usage["usage"] = _usage(part).model_dump()
                yield f"data: {json.dumps(usage)}\n\n"
        else:
            yield chunk(part, None)
    yield "data: [DONE]\n\n"
