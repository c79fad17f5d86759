"""Generation over the one request path: the preparation step (in a worker thread), then the engine, then
text. As one completion, or as text deltas for streaming. Routes only format what comes out."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from service.engine.base import collect
from service.engine.types import Finished
from service.errors import ServiceError
from service.generation.prepare import GenerationSpec, PreparedRequest, Preparer
from service.generation.schemas import (
    CandidateOut,
    GenerateIn,
    GenerateOut,
    RetrievedOut,
    ScoreIn,
    ScoreOut,
    ScoreUsage,
    UsageOut,
)
from service.inference.tokens import TextStream
from service.tenancy import UserRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    prepared: PreparedRequest


async def prepare(preparer: Preparer, spec: GenerationSpec) -> PreparedRequest:
    """SQL, retrieval and tokenizing happen off the event loop."""
    return await run_in_threadpool(preparer.prepare, spec)


async def complete(preparer: Preparer, spec: GenerationSpec) -> Completion:
    prepared = await prepare(preparer, spec)
    done = await collect(preparer.engine, prepared.request)
    ids = done.token_ids
    return Completion(preparer.codec.decode(ids), ids, done.finished.prompt_tokens, done.finished.reason, prepared)


async def stream(preparer: Preparer, prepared: PreparedRequest) -> AsyncIterator[str | Completion]:
    """Text deltas as tokens come, then the Completion. Closing the iterator (client gone) cancels the row.
    Prepare first (`prepare`), so that errors before the first byte are plain JSON."""
    text = TextStream(preparer.codec)
    async for event in preparer.engine.stream(prepared.request):
        if isinstance(event, Finished):
            if tail := text.flush():
                yield tail
            yield Completion(text.text, text.token_ids, event.prompt_tokens, event.reason, prepared)
            return
        if delta := text.push(event.token_id):
            yield delta


# --- POST /users/{id}/generate: our JSON and our SSE events ---


def generate_out(done: Completion) -> GenerateOut:
    return GenerateOut(
        text=done.text,
        retrieved=[RetrievedOut(id=r.id, score=r.score) for r in done.prepared.retrieved],
        adapter_version=done.prepared.adapter_version,
        usage=UsageOut(prompt_tokens=done.prompt_tokens, completion_tokens=len(done.token_ids)),
        finish_reason=done.finish_reason,
    )


async def generate(preparer: Preparer, user: UserRef, body: GenerateIn) -> GenerateOut:
    return generate_out(await complete(preparer, body.spec(user)))


async def generate_sse(preparer: Preparer, user: UserRef, body: GenerateIn) -> AsyncIterator[str]:
    """Prepares eagerly (errors are plain JSON), then returns the SSE event stream."""
    prepared = await prepare(preparer, body.spec(user))

    async def events() -> AsyncIterator[str]:
        try:
            async for part in stream(preparer, prepared):
                if isinstance(part, Completion):
                    yield f"event: done\ndata: {json.dumps(generate_out(part).model_dump())}\n\n"
                else:
                    yield f"data: {json.dumps({'text': part})}\n\n"
        except Exception as exc:  # headers are already sent: report in-band, never a traceback
            yield f"event: error\ndata: {json.dumps(error_event(exc))}\n\n"

    return events()


async def score(preparer: Preparer, user: UserRef, body: ScoreIn) -> ScoreOut:
    """Per candidate: its total and mean logprob as the answer (one prefill of the prompt for all of them)."""
    prepared = await prepare(preparer, body.spec(user))
    done = await collect(preparer.engine, prepared.request)
    totals = [sum(lps) for lps in done.finished.continuation_logprobs]
    top = max(totals)
    weights = [math.exp(t - top) for t in totals]
    norm = sum(weights)
    conts = prepared.request.continuations
    out = [
        CandidateOut(text=text, tokens=len(ids), logprob=total, mean_logprob=total / len(ids), probability=w / norm)
        for text, ids, total, w in zip(body.candidates, conts, totals, weights, strict=True)
    ]
    return ScoreOut(
        candidates=out,
        retrieved=[RetrievedOut(id=r.id, score=r.score) for r in prepared.retrieved],
        adapter_version=prepared.adapter_version,
        usage=ScoreUsage(prompt_tokens=done.finished.prompt_tokens, candidate_tokens=sum(map(len, conts))),
    )


def error_event(exc: BaseException) -> dict[str, str]:
    """A failure after the response started, as `{code, message}` (a ServiceError's, else a generic one)."""
    if isinstance(exc, ServiceError):
        return {"code": exc.code, "message": exc.message}
    log.exception("stream failed", exc_info=exc)
    return {"code": "generation_failed", "message": "generation failed"}
