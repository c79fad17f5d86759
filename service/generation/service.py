"""Generate for one user: retrieve from THEIR history, build the prompt, run it in a mixed batch."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.db.session import unit_of_work
from service.errors import Unprocessable
from service.generation.schemas import GenerateIn, GenerateOut, RetrievedOut, UsageOut
from service.history import service as history
from service.history.service import UserCorpus
from service.inference.runtime import ModelRuntime
from service.prompts import build_prompt
from service.retrieval.bm25 import BM25Cache
from service.tenancy import UserRef


@dataclass(frozen=True)
class PreparedPrompt:
    text: str
    retrieved: list[RetrievedOut]


def prepare_prompt(
    session: Session, user: UserRef, body: GenerateIn, cache: BM25Cache[UserCorpus], settings: Settings
) -> PreparedPrompt:
    hits = history.retrieve(session, user, body.prompt, body.retrieval_k, cache)
    profile = history.profile_text(session, user) if body.use_profile else None
    text = build_prompt(
        body.prompt,
        [h.doc for h in hits],
        profile,
        item_chars=settings.retrieval_item_chars,
        profile_chars=settings.profile_max_chars,
    )
    return PreparedPrompt(text, [RetrievedOut(id=h.doc.id, score=round(h.score, 6)) for h in hits])


def resolve_max_new_tokens(body: GenerateIn, settings: Settings) -> int:
    n = body.max_new_tokens if body.max_new_tokens is not None else settings.default_max_new_tokens
    if n > settings.max_new_tokens_cap:
        raise Unprocessable(f"max_new_tokens must be <= {settings.max_new_tokens_cap}")
    return n


async def generate(
    factory: sessionmaker[Session],
    runtime: ModelRuntime,
    cache: BM25Cache[UserCorpus],
    settings: Settings,
    user: UserRef,
    body: GenerateIn,
) -> GenerateOut:
    max_new = resolve_max_new_tokens(body, settings)

    def _prepare() -> PreparedPrompt:
        with unit_of_work(factory) as session:
            return prepare_prompt(session, user, body, cache, settings)

    prepared = await run_in_threadpool(_prepare)
    ids = runtime.encode(prepared.text, max_new)
    params = runtime.params(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    done = await runtime.complete(ids, params)
    return GenerateOut(
        text=done.text,
        retrieved=prepared.retrieved,
        adapter_version=None,
        usage=UsageOut(prompt_tokens=done.prompt_tokens, completion_tokens=len(done.token_ids)),
        finish_reason=done.finish_reason,
    )
