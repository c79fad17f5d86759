"""PAG: a textual profile of a user written by the base model from a sample of their history."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.db.session import unit_of_work
from service.errors import Unprocessable
from service.history import repository as history_repo
from service.history import service as history
from service.history.schemas import ProfileOut
from service.inference.runtime import ModelRuntime
from service.prompts import build_profile_prompt
from service.tenancy import Caller, UserRef, authorize_user

PROFILE_SAMPLE = 20  # most recent items shown to the model
PROFILE_MAX_NEW_TOKENS = 160


async def generate_profile(
    factory: sessionmaker[Session], runtime: ModelRuntime, caller: Caller, user_id: str
) -> ProfileOut:
    def read() -> tuple[UserRef, str]:
        with unit_of_work(factory) as session:
            user = authorize_user(session, caller, user_id)
            items = history_repo.all_items(session, user.pk)[-PROFILE_SAMPLE:]
            if not items:
                raise Unprocessable("the user has no history to profile")
            return user, build_profile_prompt([history.snapshot(i) for i in items])

    user, prompt = await run_in_threadpool(read)
    ids = runtime.encode(prompt, PROFILE_MAX_NEW_TOKENS)
    params = runtime.params(max_new_tokens=PROFILE_MAX_NEW_TOKENS, temperature=0.0, top_p=1.0, seed=0)
    done = await runtime.complete(ids, params)  # the base model: no user adapter

    def write() -> ProfileOut:
        with unit_of_work(factory) as session:
            return history.set_profile(session, user, done.text.strip() or "(empty)", source="generated")

    return await run_in_threadpool(write)
