"""The ONE preparation step of every generating route (`/users/{id}/generate`, `/v1/chat/completions`,
`/v1/completions`, streamed or not, the PAG profile and the evaluation): from what a route asks for to the
engine request. It resolves, once, in one unit of work: the user's current adapter version, the current
shared version, the retrieved items and the profile; then the prompt and its tokens, the token budget,
the sampling bounds and the fair-queue tenant (one per user, whatever the route).
Pure: SQL and tokens in, a `PreparedRequest` out; it has no engine effects (the engine itself warms the
adapter, swaps the shared task LoRA or writes a LoRA folder when the row is queued: `engine.base`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session, sessionmaker

from service.adapters import service as adapters
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec
from service.batching.tenant_gate import TenantGate
from service.config import Settings
from service.db.session import unit_of_work
from service.engine.base import Engine, check_fits
from service.engine.types import AdapterRef, EngineRequest, SamplingParams
from service.errors import BadRequest
from service.generation.grammar import GrammarCompiler
from service.generation.sampling import Resolved, SamplingOptions, resolve_sampling
from service.history import service as history
from service.history.service import UserCorpus
from service.inference.tokens import ChatTemplateRefused, PromptCodec
from service.prompts import build_prompt, context_levels
from service.retrieval.bm25 import BM25Cache
from service.tenancy import UserRef

BASE_TENANT = "_base"  # requests that no user's data shapes (an admin calling the base model)


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Personalization:
    retrieval_k: int = 0
    use_profile: bool = False
    use_adapter: bool = False


@dataclass(frozen=True)
class GenerationSpec:
    """What a route asks for, before anything is resolved."""

    user: UserRef | None  # whose history and adapter personalise the answer; None: the plain base model
    prompt: str | tuple[ChatTurn, ...]  # raw completion text, or chat turns (the last user turn is the request)
    personalization: Personalization
    sampling: SamplingOptions
    # Scoring instead of generating: texts whose logprobs after the prompt (as the answer) are wanted.
    candidates: tuple[str, ...] = ()

    @property
    def query(self) -> str:
        """The request text: what retrieval searches with and what the context is built around."""
        if isinstance(self.prompt, str):
            return self.prompt
        return next((t.content for t in reversed(self.prompt) if t.role == "user"), "")


@dataclass(frozen=True)
class Retrieved:
    id: str
    score: float


@dataclass(frozen=True)
class PreparedRequest:
    rows: tuple[EngineRequest, ...]  # n independent rows of the same prompt (usually one)
    retrieved: tuple[Retrieved, ...]
    adapter_version: int | None
    shared_version: int | None
    stop: tuple[str, ...] = ()  # stop strings: the generation service cuts the text at the first one

    @property
    def request(self) -> EngineRequest:
        return self.rows[0]


@dataclass(frozen=True)
class _Context:
    """What one unit of work resolved for a request."""

    retrieved: list[history.RetrievedDoc]
    profile: str | None
    adapter: AdapterRef | None
    shared: AdapterRef | None
    shared_read_at: float | None = None  # time.monotonic() before `shared` was read (the engine's newest read wins)


class Preparer:
    """Built once by the composition root; `prepare` runs in a worker thread (it does SQL and tokenizing)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        bm25: BM25Cache[UserCorpus],
        store: AdapterStore,
        spec: BaseModelSpec,
        codec: PromptCodec,
        engine: Engine,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self._bm25 = bm25
        self._store = store
        self._spec = spec
        self.codec = codec
        self.engine = engine
        self.grammars = grammars
        # A request being prepared holds a worker thread and a DB connection: one user's burst may not take them.
        self.gate = TenantGate(settings.prepare_per_user_max, settings.queue_per_user_max)

    def _sampling(self, spec: GenerationSpec) -> Resolved:
        if spec.candidates:  # scoring: prefill only
            return Resolved(SamplingParams(max_new_tokens=0, stop_token_ids=self.codec.stop_ids), (), 1)
        return resolve_sampling(spec.sampling, self.settings, self.codec.stop_ids, self.grammars, self.codec.vocab_size)

    def prepare(self, spec: GenerationSpec) -> PreparedRequest:
        resolved = self._sampling(spec)
        tenant = tenant_of(spec)
        # Before retrieval and tokenising: a tenant whose queue share is used up costs no BM25 pass per request.
        self.engine.check_room(tenant, resolved.n)
        with unit_of_work(self.session_factory) as session:
            ctx = self._resolve(session, spec)
        continuations = tuple(tuple(self.codec.encode_continuation(c)) for c in spec.candidates)
        more = resolved.row(0).max_new_tokens + sum(map(len, continuations))
        ids, ctx = self._encode_within(spec, ctx, self.engine.limits.context_length - more)
        deadline = time.monotonic() + self.settings.request_timeout_s
        rows = tuple(
            EngineRequest(
                uuid.uuid4().hex,
                ids,
                resolved.row(i),
                ctx.adapter,
                tenant,
                deadline,
                continuations,
                ctx.shared,
                ctx.shared_read_at,
            )
            for i in range(resolved.n)
        )
        # Here too (the engine checks again): a stream's errors must come before its first byte.
        check_fits(rows[0], self.engine.limits)
        self.engine.check_room(tenant, len(rows))  # again: the queue may have filled while this one read
        shared_version = ctx.shared.version if ctx.shared is not None else None
        retrieved = tuple(Retrieved(h.doc.id, round(h.score, 6)) for h in ctx.retrieved)
        adapter_version = ctx.adapter.version if ctx.adapter is not None else None
        return PreparedRequest(rows, retrieved, adapter_version, shared_version, resolved.stop)

    def _resolve(self, session: Session, spec: GenerationSpec) -> _Context:
        user, p = spec.user, spec.personalization
        hits = history.retrieve(session, user, spec.query, p.retrieval_k, self._bm25) if user is not None else []
        profile = history.profile_text(session, user) if user is not None and p.use_profile else None
        adapter = None
        if user is not None and p.use_adapter:
            adapter = adapters.serving_ref(session, self._store, user.storage_key, self._spec)
        read_at = time.monotonic()
        return _Context(hits, profile, adapter, adapters.shared_ref(session, self._store), read_at)

    def _encode_within(self, spec: GenerationSpec, ctx: _Context, budget: int) -> tuple[tuple[int, ...], _Context]:
        """The prompt's tokens with as much of the context the server adds as fits `budget` tokens: the
        lowest-ranked retrieved items go first, then the profile (they are capped in characters, and a
        character is up to a token or more in some scripts); what the caller sent is never cut (422 if it
        alone does not fit). Returns the context actually used (the response lists those items).
        A long prompt is encoded a few times, not once per item: the caller's text alone first (a prompt that
        can never fit is refused after two encodes), then a binary search over how much context to keep."""
        ids = self._encode(spec, ctx)
        levels = _context_levels(ctx) if len(ids) > budget else []  # the most context first, none last
        if len(levels) <= 1:  # it fits, or there is no context to drop
            return tuple(ids), ctx
        ids = self._encode(spec, levels[-1])
        lo, hi, best = 1, len(levels) - 1, (ids, levels[-1])
        if len(ids) > budget:
            return tuple(ids), levels[-1]
        while lo < hi:  # levels[hi] fits; levels[lo - 1] does not
            mid = (lo + hi) // 2
            ids = self._encode(spec, levels[mid])
            if len(ids) <= budget:
                hi, best = mid, (ids, levels[mid])
            else:
                lo = mid + 1
        return tuple(best[0]), best[1]

    def _encode(self, spec: GenerationSpec, ctx: _Context) -> list[int]:
        s = self.settings
        request = build_prompt(
            spec.query,
            [h.doc for h in ctx.retrieved],
            ctx.profile,
            item_chars=s.retrieval_item_chars,
            profile_chars=s.profile_max_chars,
        )
        if isinstance(spec.prompt, str):
            return self.codec.encode_text(request)
        try:
            return self.codec.encode_chat(_with_request(spec.prompt, request))
        except ChatTemplateRefused as exc:
            raise BadRequest(str(exc)) from exc


def _context_levels(ctx: _Context) -> list[_Context]:
    """`ctx` with less and less of the server's context: retrieved items dropped from the lowest-ranked, then
    the profile."""
    levels = context_levels(len(ctx.retrieved), ctx.profile is not None)  # the rule training follows too
    return [replace(ctx, retrieved=ctx.retrieved[:n], profile=ctx.profile if p else None) for n, p in levels]


def tenant_of(spec: GenerationSpec) -> str:
    """The fair-queue tenant of a request: its user, whatever the route."""
    return spec.user.storage_key if spec.user is not None else BASE_TENANT


def _with_request(turns: Sequence[ChatTurn], request: str) -> list[dict[str, str]]:
    """Chat turns with the last user turn replaced by the built request (context + the user's text)."""
    messages = [{"role": "system" if t.role == "developer" else t.role, "content": t.content} for t in turns]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is not None:
        messages[last_user]["content"] = request
    return messages
