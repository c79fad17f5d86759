"""OpenAI wire formats over the one request path. `model` picks whose data personalise the answer
("personal" = the caller's own history and adapter, the base model's name = none, `user:<id>` for admins);
the request becomes a GenerationSpec, and the completions or their streams are formatted as OpenAI does.
Parameters outside the accepted list are refused (400 `unsupported_parameter`), never dropped."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db.session import unit_of_work
from service.errors import NotFound, ServiceError, UnsupportedParameter, openai_error
from service.generation import service as generation
from service.generation.prepare import ChatTurn, GenerationSpec, Personalization, Preparer
from service.generation.sampling import SamplingOptions
from service.generation.service import Completion, Delta
from service.generation.text import TokenOut
from service.inference.tokens import PromptCodec
from service.openai_compat.schemas import ChatCompletionIn, CommonParams, CompletionIn, ModelCard, ModelList, Usage
from service.streams import StreamRegistry
from service.tenancy import Caller, UserRef, authorize_user
from service.threads import run_to_its_end

PERSONAL = "personal"
DEFAULT_CHAT_RETRIEVAL_K = 3  # chat with the personal model: the user's history grounds the answer
OPENAI_DEFAULT_TEMPERATURE = 1.0
# A logit_bias key (not str.isdigit: "²" is a digit that int() refuses; at most 10 digits: int() refuses
# strings over 4300 digits with a ValueError, and no vocabulary has 10**10 tokens).
TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,10}")


def list_models(caller: Caller, base_name: str) -> ModelList:
    cards = [ModelCard(id=base_name)]
    if not caller.is_admin:
        cards.insert(0, ModelCard(id=PERSONAL))
    return ModelList(data=cards)


@dataclass(frozen=True)
class Target:
    user: UserRef | None  # whose history/profile/adapter personalise the answer
    personal: bool  # the user's own adapter (and, by default, their history and profile)


def resolve_target(session_factory: sessionmaker[Session], base_name: str, caller: Caller, model: str) -> Target:
    """`personal` or `user:<own id>`: the caller's own adapter (the second form is the name a router sees,
    e.g. in metric labels); `user:<id>` of another user: admins only (others 403); the base model's name."""
    with unit_of_work(session_factory) as session:
        if model == PERSONAL and not caller.is_admin and caller.user_id is not None:
            return Target(authorize_user(session, caller, caller.user_id), True)
        if model.startswith("user:"):
            return Target(authorize_user(session, caller, model.removeprefix("user:")), True)
        if model == base_name:
            user = authorize_user(session, caller, caller.user_id) if caller.user_id is not None else None
            return Target(user, False)
    raise NotFound(f"model {model!r} does not exist; see GET /v1/models")


# Fields that routers add to every /v1 body at values asking for what we do anyway (vllm-router 0.1.17
# re-serialises requests with these; a streaming-off, no-echo, no-reasoning model honours them as given).
NEUTRAL_DEFAULTS: dict[str, object] = {
    "echo": False,
    "no_stop_trim": False,
    "skip_special_tokens": True,
    "return_hidden_states": False,
    "continue_final_message": False,
    "include_reasoning": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
}


def _neutral(name: str, value: object) -> bool:
    return name in NEUTRAL_DEFAULTS and value is NEUTRAL_DEFAULTS[name]


def refuse_unsupported(body: CommonParams) -> None:
    """Unknown parameters with a value are refused by name (tools, functions, echo, best_of, ...), in the
    body and in chat messages (tool_calls, ...); the router-added fields at their neutral values pass."""
    extra = sorted(k for k, v in (body.model_extra or {}).items() if v is not None and not _neutral(k, v))
    if body.stream_options is not None:  # vLLM's continuous_usage_stats, ...: not served, so not dropped either
        given = (body.stream_options.model_extra or {}).items()
        extra += sorted(f"stream_options.{k}" for k, v in given if v is not None)
    for m in getattr(body, "messages", ()):
        extra += sorted(f"messages[].{k}" for k, v in (m.model_extra or {}).items() if v is not None and k != "name")
        for part in m.content if isinstance(m.content, list) else ():
            if part.type != "text":  # images, audio, files: a text-only model would answer without them
                extra.append(f"messages[].content[].type={part.type}")
            else:
                given = (part.model_extra or {}).items()
                extra += sorted(f"messages[].content[].{k}" for k, v in given if v is not None)
    if extra:
        accepted = sorted(name for name in type(body).model_fields)
        unique = list(dict.fromkeys(extra))
        raise UnsupportedParameter(
            f"unsupported parameter(s): {', '.join(unique)}", details={"unsupported": unique, "accepted": accepted}
        )


def _sampling(body: CommonParams, max_tokens: int | None, logprobs: int | None) -> SamplingOptions:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    given = body.logit_bias or {}
    if not all(TOKEN_ID_KEY.fullmatch(k) for k in given):
        raise UnsupportedParameter("logit_bias keys must be token ids")
    bias = {int(k): v for k, v in given.items()}
    if len(bias) != len(given):  # "42" and "042"
        raise UnsupportedParameter("logit_bias names a token id more than once")
    return SamplingOptions(
        max_new_tokens=max_tokens,
        temperature=OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=stop,
        logprobs=logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias,
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0,
        response_format=body.response_format.model_dump() if body.response_format is not None else None,
        n=body.n or 1,
    )


def _spec(
    target: Target, body: CommonParams, prompt: str | tuple[ChatTurn, ...], sampling: SamplingOptions
) -> GenerationSpec:
    chat = isinstance(prompt, tuple)
    default_k = DEFAULT_CHAT_RETRIEVAL_K if target.personal and chat else 0
    k = body.retrieval_k if body.retrieval_k is not None else default_k
    profile = body.use_profile if body.use_profile is not None else (target.personal and chat)
    personalization = Personalization(k if target.user is not None else 0, profile, target.personal)
    return GenerationSpec(user=target.user, prompt=prompt, personalization=personalization, sampling=sampling)


async def _target(preparer: Preparer, caller: Caller, model: str) -> Target:
    return await run_to_its_end(resolve_target, preparer.session_factory, preparer.engine.model_name, caller, model)


async def chat(preparer: Preparer, streams: StreamRegistry, caller: Caller, body: ChatCompletionIn) -> Any:
    refuse_unsupported(body)
    target = await _target(preparer, caller, body.model)
    turns = tuple(ChatTurn(m.role, m.text()) for m in body.messages)
    k = (body.top_logprobs or 0) if body.logprobs else None
    sampling = _sampling(body, body.max_completion_tokens or body.max_tokens, k)
    return await _respond(preparer, streams, caller, body, _spec(target, body, turns, sampling), chat=True)


async def complete(preparer: Preparer, streams: StreamRegistry, caller: Caller, body: CompletionIn) -> Any:
    refuse_unsupported(body)
    target = await _target(preparer, caller, body.model)
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    # A raw completion continues the text as given; retrieved items/profile only when the client asks.
    sampling = _sampling(body, body.max_tokens, body.logprobs)
    return await _respond(preparer, streams, caller, body, _spec(target, body, text, sampling), chat=False)


async def _respond(
    preparer: Preparer, streams: StreamRegistry, caller: Caller, body: CommonParams, spec: GenerationSpec, *, chat: bool
) -> Any:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    fmt = _Format(rid, int(time.time()), body.model, chat, preparer.codec)
    if body.stream:
        prepared = await generation.prepare(preparer, spec)  # errors before the first byte are plain JSON
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        wants_logprobs = prepared.request.sampling.logprobs is not None
        parts = streams.guard(caller.key_hash, generation.stream(preparer, prepared))
        return fmt.events(parts, len(prepared.rows), include_usage, wants_logprobs)
    return fmt.response(await generation.complete(preparer, spec))


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(done: list[Completion]) -> Usage:
    prompt, completion = done[0].prompt_tokens, sum(d.generated for d in done)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclass(frozen=True)
class _Format:
    rid: str
    created: int
    model: str
    chat: bool
    codec: PromptCodec

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def logprobs(self, tokens: list[TokenOut], base_offset: int = 0) -> dict[str, Any]:
        """A token shows as its own bytes: `bytes` exactly, `token` as text with bytes that are not UTF-8 on their
        own (part of a character) as `\\xNN` escapes, as OpenAI shows them."""
        text = self.codec.token_text
        if self.chat:

            def entry(token_id: int, lp: float) -> dict[str, Any]:
                return {"token": text(token_id), "logprob": lp, "bytes": list(self.codec.token_bytes(token_id))}

            content = [
                {**entry(t.token_id, t.logprob or 0.0), "top_logprobs": [entry(x.token_id, x.logprob) for x in t.top]}
                for t in tokens
            ]
            return {"content": content}
        return {
            "tokens": [text(t.token_id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            # The chosen token always among them (OpenAI: up to logprobs + 1 entries; vLLM likewise).
            "top_logprobs": [
                {**{text(x.token_id): x.logprob for x in t.top}, text(t.token_id): t.logprob} for t in tokens
            ],
            "text_offset": [base_offset + t.offset for t in tokens],
        }

    def response(self, done: list[Completion]) -> dict[str, Any]:
        choices = []
        for d in done:
            wants = d.prepared.request.sampling.logprobs is not None
            choice: dict[str, Any] = {
                "index": d.index,
                "finish_reason": _finish(d.finish_reason),
                "logprobs": self.logprobs(d.tokens) if wants else None,
            }
            if self.chat:
                choice["message"] = {"role": "assistant", "content": d.text}
            else:
                choice["text"] = d.text
            choices.append(choice)
        return {**self._envelope(self.kind, choices), "usage": _usage(done).model_dump()}

    def _chunk(self, index: int, delta: str | None, finish: str | None, logprobs: dict[str, Any] | None) -> str:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = {"content": delta} if delta else {}
        else:
            choice["text"] = delta or ""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps(self._envelope(kind, [choice]))}\n\n"

    def _first(self, index: int) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        choice: dict[str, Any] = {"index": index, "finish_reason": None, "logprobs": None}
        choice["delta" if self.chat else "text"] = {"role": "assistant", "content": ""} if self.chat else ""
        return f"data: {json.dumps(self._envelope(kind, [choice]))}\n\n"

    async def events(
        self, parts: AsyncIterator[Delta | Completion], rows: int, include_usage: bool, logprobs: bool
    ) -> AsyncIterator[str]:
        for i in range(rows):
            yield self._first(i)
        done: list[Completion] = []
        try:
            async for part in parts:
                if isinstance(part, Completion):
                    done.append(part)
                    yield self._chunk(part.index, None, _finish(part.finish_reason), None)
                elif part.text or logprobs:  # a text-less delta only carries its tokens' logprobs
                    lp = self.logprobs(part.tokens) if logprobs else None  # token offsets are row-absolute
                    yield self._chunk(part.index, part.text, None, lp)
            if include_usage and done:
                usage = {**self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])}
                yield f"data: {json.dumps({**usage, 'usage': _usage(done).model_dump()})}\n\n"
        except Exception as exc:  # headers are already sent: report in-band, never a traceback
            status = exc.status if isinstance(exc, ServiceError) else 500
            yield f"data: {json.dumps({'error': openai_error(status, generation.error_event(exc))})}\n\n"
        yield "data: [DONE]\n\n"
