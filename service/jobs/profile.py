"""PAG: a textual profile of a user written by the base model from a sample of their history (an admin
route that waits for the answer; it goes through the one request path like every generating route)."""

from __future__ import annotations

import re

from service.db.session import unit_of_work
from service.errors import Unprocessable
from service.generation import service as generation
from service.generation.prepare import ChatTurn, GenerationSpec, Personalization, Preparer
from service.generation.sampling import SamplingOptions
from service.history import repository as history_repo
from service.history import service as history
from service.history.schemas import ProfileOut
from service.prompts import build_profile_prompt
from service.tenancy import Caller, UserRef, authorize_user
from service.threads import run_to_its_end

PROFILE_SAMPLE = 20  # most recent items shown to the model
PROFILE_MAX_NEW_TOKENS = 160
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _storable_text(generated: str) -> str:
    """Model output made storable as user text must be (history.schemas refuses it from users): NULs dropped
    (PostgreSQL text cannot hold U+0000; SmolLM2's token 190 decodes to it), lone surrogates (no UTF-8 for them,
    sealed or not) replaced by U+FFFD. The same on every database."""
    return _LONE_SURROGATE.sub("\ufffd", generated.replace("\x00", "")).strip() or "(empty)"


async def generate_profile(preparer: Preparer, caller: Caller, user_id: str) -> ProfileOut:
    factory = preparer.session_factory

    max_new_tokens = min(PROFILE_MAX_NEW_TOKENS, preparer.settings.max_new_tokens_cap)

    def read() -> tuple[UserRef, str]:
        with unit_of_work(factory) as session:
            user = authorize_user(session, caller, user_id)
            items = [history.snapshot(i) for i in history_repo.latest_items(session, user, PROFILE_SAMPLE)]
        if not items:
            raise Unprocessable("the user has no history to profile")
        # The oldest of the sample go until the prompt fits the model's context in tokens (items are clipped in
        # characters: in some scripts a character is a token or more).
        budget = preparer.engine.limits.context_length - max_new_tokens
        prompt = build_profile_prompt(items)
        while len(items) > 1 and len(preparer.codec.encode_chat([{"role": "user", "content": prompt}])) > budget:
            items = items[1:]
            prompt = build_profile_prompt(items)
        return user, prompt

    user, prompt = await run_to_its_end(read)
    spec = GenerationSpec(
        user=user,
        prompt=(ChatTurn("user", prompt),),
        personalization=Personalization(),  # the base model (+ shared LoRA): no user adapter, no context
        sampling=SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0, seed=0),
    )
    (done,) = await generation.complete(preparer, spec)

    def write() -> ProfileOut:
        with unit_of_work(factory) as session:
            return history.set_profile(session, user, _storable_text(done.text), source="generated")

    return await run_to_its_end(write)
