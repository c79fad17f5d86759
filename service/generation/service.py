"""Generate for one user: retrieve from THEIR history, build the prompt, pick THEIR current adapter,
run it in a mixed batch (plain or streamed as Server-Sent Events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.adapters import service as adapters
from service.adapters.cache import AdapterKey
from service.db.models import SHARED_OWNER
from service.db.session import unit_of_work
from service.errors import Unprocessable
from service.generation.schemas import GenerateIn, GenerateOut, RetrievedOut, UsageOut
from service.history import service as history
from service.inference.runtime import Completion, ModelRuntime
from service.prompts import build_prompt
from service.state import AppState
from service.tenancy import UserRef


@dataclass(frozen=True)
class PreparedRequest:
    text: str
    retrieved: list[RetrievedOut]
    adapter: AdapterKey | None
    adapter_version: int | None
    shared_version: int | None = None


def prepare(session: Session, state: AppState, user: UserRef, body: GenerateIn) -> PreparedRequest:
    settings = state.settings
    hits = history.retrieve(session, user, body.prompt, body.retrieval_k, state.bm25)
    profile = history.profile_text(session, user) if body.use_profile else None
    text = build_prompt(
        body.prompt,
        [h.doc for h in hits],
        profile,
        item_chars=settings.retrieval_item_chars,
        profile_chars=settings.profile_max_chars,
    )
    key, version = None, None
    if body.use_adapter and state.adapters is not None:
        key, version = adapters.serving_key(session, user.storage_key, state.adapters.spec)
    shared = adapters.current_version(session, SHARED_OWNER)
    retrieved = [RetrievedOut(id=h.doc.id, score=round(h.score, 6)) for h in hits]
    return PreparedRequest(text, retrieved, key, version, shared)


def sync_shared(state: AppState, version: int | None) -> None:
    """Make the runtime merge the given shared LoRA version (None: none) into its base weights."""
    runtime = state.runtime
    if runtime is None:
        return
    runtime.request_shared(adapters.shared_weights(state.store, version), version)


def resolve_max_new_tokens(body: GenerateIn, cap: int, default: int) -> int:
    n = body.max_new_tokens if body.max_new_tokens is not None else default
    if n > cap:
        raise Unprocessable(f"max_new_tokens must be <= {cap}")
    return n


async def _prepare(state: AppState, user: UserRef, body: GenerateIn) -> PreparedRequest:
    def run() -> PreparedRequest:
        with unit_of_work(state.session_factory) as session:
            prepared = prepare(session, state, user, body)
        if prepared.adapter is not None and state.cache is not None:
            state.cache.prefetch(prepared.adapter)  # disk -> host here, not in the batch thread
        runtime = state.runtime
        if runtime is not None and prepared.shared_version != runtime.shared_target:
            sync_shared(state, prepared.shared_version)  # applied before the next batch
        return prepared

    return await run_in_threadpool(run)


def _response(prepared: PreparedRequest, done: Completion) -> GenerateOut:
    return GenerateOut(
        text=done.text,
        retrieved=prepared.retrieved,
        adapter_version=prepared.adapter_version,
        usage=UsageOut(prompt_tokens=done.prompt_tokens, completion_tokens=len(done.token_ids)),
        finish_reason=done.finish_reason,
    )


async def generate(state: AppState, runtime: ModelRuntime, user: UserRef, body: GenerateIn) -> GenerateOut:
    s = state.settings
    max_new = resolve_max_new_tokens(body, s.max_new_tokens_cap, s.default_max_new_tokens)
    prepared = await _prepare(state, user, body)
    ids = runtime.encode(prepared.text, max_new)
    params = runtime.params(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    return _response(prepared, await runtime.complete(ids, params, prepared.adapter, tenant=user.storage_key))


async def generate_stream(
    state: AppState, runtime: ModelRuntime, user: UserRef, body: GenerateIn
) -> AsyncIterator[str]:
    """Validates and prepares eagerly (errors are plain JSON), then returns the SSE event stream."""
    s = state.settings
    max_new = resolve_max_new_tokens(body, s.max_new_tokens_cap, s.default_max_new_tokens)
    prepared = await _prepare(state, user, body)
    ids = runtime.encode(prepared.text, max_new)
    params = runtime.params(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p, seed=body.seed)

    async def events() -> AsyncIterator[str]:
        try:
            async for part in runtime.stream(ids, params, prepared.adapter, tenant=user.storage_key):
                if isinstance(part, Completion):
                    final = _response(prepared, part).model_dump()
                    yield f"event: done\ndata: {json.dumps(final)}\n\n"
                else:
                    yield f"data: {json.dumps({'text': part})}\n\n"
        except Exception as exc:  # headers are already sent: report in-band, never a traceback
            code = getattr(exc, "code", "internal_error")
            message = getattr(exc, "message", "generation failed")
            yield f"event: error\ndata: {json.dumps({'code': code, 'message': message})}\n\n"

    return events()
