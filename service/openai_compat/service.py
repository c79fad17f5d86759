"""OpenAI wire formats over the one request path. `model` picks whose data personalise the answer
("personal" = the caller's own history and adapter, the base model's name = none, `user:<id>` for admins);
the request becomes a GenerationSpec, and the completion or its stream is formatted as OpenAI does."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.db.session import unit_of_work
from service.errors import NotFound
from service.generation import service as generation
from service.generation.prepare import ChatTurn, GenerationSpec, Personalization, Preparer, SamplingOptions
from service.generation.service import Completion
from service.openai_compat.schemas import ChatCompletionIn, CommonParams, CompletionIn, ModelCard, ModelList, Usage
from service.state import AppState
from service.tenancy import Caller, UserRef, authorize_user

PERSONAL = "personal"
DEFAULT_CHAT_RETRIEVAL_K = 3  # chat with the personal model: the user's history grounds the answer


def list_models(caller: Caller, base_name: str) -> ModelList:
    cards = [ModelCard(id=base_name)]
    if not caller.is_admin:
        cards.insert(0, ModelCard(id=PERSONAL))
    return ModelList(data=cards)


@dataclass(frozen=True)
class Target:
    user: UserRef | None  # whose history/profile/adapter personalise the answer
    personal: bool  # the user's own adapter (and, by default, their history and profile)


def resolve_target(state: AppState, caller: Caller, model: str) -> Target:
    base_name = state.engine.model_name
    with unit_of_work(state.session_factory) as session:
        if model == PERSONAL and not caller.is_admin and caller.user_id is not None:
            return Target(authorize_user(session, caller, caller.user_id), True)
        if model.startswith("user:") and caller.is_admin:
            return Target(authorize_user(session, caller, model.removeprefix("user:")), True)
        if model == base_name:
            user = authorize_user(session, caller, caller.user_id) if caller.user_id is not None else None
            return Target(user, False)
    raise NotFound(f"model {model!r} does not exist; see GET /v1/models")


def _spec(target: Target, body: CommonParams, prompt: str | tuple[ChatTurn, ...], default_k: int) -> GenerationSpec:
    k = body.retrieval_k if body.retrieval_k is not None else default_k
    profile = body.use_profile if body.use_profile is not None else (target.personal and isinstance(prompt, tuple))
    return GenerationSpec(
        user=target.user,
        prompt=prompt,
        personalization=Personalization(k if target.user is not None else 0, profile, target.personal),
        sampling=SamplingOptions(
            body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p, body.seed
        ),
    )


async def chat(state: AppState, caller: Caller, body: ChatCompletionIn) -> Any:
    target = await run_in_threadpool(resolve_target, state, caller, body.model)
    turns = tuple(ChatTurn(m.role, m.text()) for m in body.messages)
    spec = _spec(target, body, turns, DEFAULT_CHAT_RETRIEVAL_K if target.personal else 0)
    return await _respond(state.preparer, body, spec, chat=True)


async def complete(state: AppState, caller: Caller, body: CompletionIn) -> Any:
    target = await run_in_threadpool(resolve_target, state, caller, body.model)
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    # A raw completion continues the text as given; retrieved items/profile only when the client asks.
    return await _respond(state.preparer, body, _spec(target, body, text, 0), chat=False)


async def _respond(preparer: Preparer, body: CommonParams, spec: GenerationSpec, *, chat: bool) -> Any:
    fmt = _Format(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time()), body.model, chat)
    if body.stream:
        prepared = await generation.prepare(preparer, spec)  # errors before the first byte are plain JSON
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return fmt.events(generation.stream(preparer, prepared), include_usage)
    return fmt.response(await generation.complete(preparer, spec))


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(done: Completion) -> Usage:
    completion = len(done.token_ids)
    return Usage(
        prompt_tokens=done.prompt_tokens, completion_tokens=completion, total_tokens=done.prompt_tokens + completion
    )


@dataclass(frozen=True)
class _Format:
    rid: str
    created: int
    model: str
    chat: bool

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def response(self, done: Completion) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(done.finish_reason), "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice["text"] = done.text
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return {**out, "usage": _usage(done).model_dump()}

    def _chunk(self, delta: str | None, finish: str | None, first: bool = False) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": delta} if delta else {})
        else:
            choice["text"] = delta or ""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps(self._envelope(kind, [choice]))}\n\n"

    async def events(self, parts: AsyncIterator[str | Completion], include_usage: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        yield self._chunk("", None, first=True)
        try:
            async for part in parts:
                if isinstance(part, Completion):
                    yield self._chunk(None, _finish(part.finish_reason))
                    if include_usage:
                        usage = {**self._envelope(kind, []), "usage": _usage(part).model_dump()}
                        yield f"data: {json.dumps(usage)}\n\n"
                else:
                    yield self._chunk(part, None)
        except Exception as exc:  # headers are already sent: report in-band, never a traceback
            yield f"data: {json.dumps({'error': generation.error_event(exc)})}\n\n"
        yield "data: [DONE]\n\n"
