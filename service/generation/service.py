"""Generation over the one request path: the preparation step (in a worker thread), then the engine, then
text. As one completion, or as text deltas for streaming. Routes only format what comes out."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.engine.base import collect, queue_errors
from service.engine.types import Finished
from service.errors import ServiceError
from service.generation.prepare import GenerationSpec, PreparedRequest, Preparer, tenant_of
from service.generation.schemas import (
    CandidateOut,
    GenerateIn,
    GenerateOut,
    RetrievedOut,
    ScoreIn,
    ScoreOut,
    ScoreUsage,
    TokenLogprobOut,
    TopLogprobOut,
    UsageOut,
)
from service.generation.text import RowText, TokenOut
from service.inference.tokens import PromptCodec
from service.streams import StreamRegistry
from service.tenancy import UserRef
from service.threads import run_to_its_end

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[TokenOut]  # the tokens behind `text` (a stop string's tokens are cut with it)
    generated: int  # tokens the engine produced for the row (usage)
    prompt_tokens: int
    finish_reason: str
    prepared: PreparedRequest
    index: int = 0  # the row, when n > 1

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]


@dataclass(frozen=True)
class Delta:
    index: int  # the row, when n > 1
    text: str
    tokens: list[TokenOut]  # the tokens whose text starts in this delta (for streamed logprobs); the last
    # delta of a row may have no text and only tokens (those that decode to nothing, e.g. special tokens)


Part = Delta | Completion


async def prepare(preparer: Preparer, spec: GenerationSpec) -> PreparedRequest:
    """SQL, retrieval and tokenizing happen off the event loop, at most `OPPU_PREPARE_PER_USER_MAX` of a
    user's requests at once (the rest wait here, holding no thread or connection; past
    `OPPU_QUEUE_PER_USER_MAX` of them at the gate: 429)."""
    with queue_errors(preparer.engine.on_reject):  # the gate's refusal; the step's own errors are ServiceErrors
        async with preparer.gate.admit(tenant_of(spec)):
            return await run_to_its_end(preparer.prepare, spec)  # the gate's place is held until it ends


async def _row(preparer: Preparer, prepared: PreparedRequest, index: int) -> AsyncIterator[Part]:
    """One row's text deltas, then its Completion. A stop string ends the row early (its engine row is
    cancelled by closing the engine's stream)."""
    text = RowText(preparer.codec, prepared.stop)
    events = preparer.engine.stream(prepared.rows[index])
    generated, reason, prompt_tokens = 0, "length", len(prepared.rows[index].prompt_ids)
    try:
        async for event in events:
            if isinstance(event, Finished):
                reason, prompt_tokens = event.reason, event.prompt_tokens
                break
            generated += 1
            if delta := text.push(event):
                yield Delta(index, delta, text.take_tokens())
            if text.stopped:
                reason = "stop"
                break
    finally:
        await events.aclose()
    tail = text.finish()
    if (held := text.take_tokens()) or tail:  # text-less tokens too: streamed logprobs hold every token
        yield Delta(index, tail, held)
    yield Completion(text.text, text.tokens, generated, prompt_tokens, reason, prepared, index)


async def stream(preparer: Preparer, prepared: PreparedRequest) -> AsyncIterator[Part]:
    """Every row's text deltas as tokens come (rows interleaved), each row ending with its Completion.
    Closing the iterator (client gone) cancels the rows. Prepare first (`prepare`), so that errors before
    the first byte are plain JSON."""
    if len(prepared.rows) == 1:
        async for part in _row(preparer, prepared, 0):
            yield part
        return
    async for part in _merge([_row(preparer, prepared, i) for i in range(len(prepared.rows))]):
        yield part


async def complete(preparer: Preparer, spec: GenerationSpec) -> list[Completion]:
    """Every row's Completion, in row order."""
    prepared = await prepare(preparer, spec)
    done = [part async for part in stream(preparer, prepared) if isinstance(part, Completion)]
    return sorted(done, key=lambda c: c.index)


async def _merge(iterators: list[AsyncIterator[Part]]) -> AsyncIterator[Part]:
    """Items of several async iterators as they come; all are closed when the consumer stops."""
    queue: asyncio.Queue[Part | BaseException | None] = asyncio.Queue()

    async def pump(it: AsyncIterator[Part]) -> None:
        try:
            async for item in it:
                await queue.put(item)
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(it)) for it in iterators]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for task in tasks:
            task.cancel()


# --- POST /users/{id}/generate: our JSON and our SSE events ---


def generate_out(done: Completion, codec: PromptCodec) -> GenerateOut:
    wants = done.prepared.request.sampling.logprobs is not None
    return GenerateOut(
        text=done.text,
        retrieved=[RetrievedOut(id=r.id, score=r.score) for r in done.prepared.retrieved],
        adapter_version=done.prepared.adapter_version,
        usage=UsageOut(prompt_tokens=done.prompt_tokens, completion_tokens=done.generated),
        finish_reason=done.finish_reason,
        logprobs=[_token_logprob(t, codec) for t in done.tokens] if wants else None,
    )


def _token_logprob(token: TokenOut, codec: PromptCodec) -> TokenLogprobOut:
    top = [TopLogprobOut(token=codec.token_text(t.token_id), logprob=t.logprob) for t in token.top]
    return TokenLogprobOut(token=codec.token_text(token.token_id), logprob=token.logprob or 0.0, top_logprobs=top)


async def generate(preparer: Preparer, user: UserRef, body: GenerateIn) -> GenerateOut:
    (done,) = await complete(preparer, body.spec(user))
    return generate_out(done, preparer.codec)


async def generate_sse(
    preparer: Preparer, user: UserRef, body: GenerateIn, streams: StreamRegistry, key_hash: str | None
) -> AsyncIterator[str]:
    """Prepares eagerly (errors are plain JSON), then returns the SSE event stream (ended early, with an
    error event, if the caller's key is revoked meanwhile)."""
    prepared = await prepare(preparer, body.spec(user))

    async def events() -> AsyncIterator[str]:
        try:
            async for part in streams.guard(key_hash, stream(preparer, prepared)):
                if isinstance(part, Completion):
                    out = generate_out(part, preparer.codec).model_dump()
                    if out["logprobs"] is None:
                        del out["logprobs"]
                    yield f"event: done\ndata: {json.dumps(out)}\n\n"
                elif part.text:  # a text-less delta only carries streamed logprobs, which come with `done` here
                    yield f"data: {json.dumps({'text': part.text})}\n\n"
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
