"""Preparer.prepare (service/generation/prepare.py) on a real SQLite unit of work, with a fake codec and an
engine that offers only its limits and model name: what one request resolves (tenant, rows, deadline,
adapter, shared adapter, retrieved items, profile, prompt tokens), the prompt-fits check, and that
preparing has no engine effects at all (the engine applies adapters when a row is queued)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.adapters import repository as adapters_repo
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec
from service.config import Settings
from service.db.models import SHARED_OWNER, Adapter
from service.db.session import Database, unit_of_work
from service.engine.base import EngineLimits
from service.errors import BadRequest, Conflict, PromptTooLong, TooManyRequests
from service.generation.prepare import (
    BASE_TENANT,
    ChatTurn,
    GenerationSpec,
    Personalization,
    PreparedRequest,
    Preparer,
)
from service.generation.sampling import SamplingOptions
from service.history import service as history
from service.history.schemas import HistoryAppendIn, HistoryItemIn
from service.history.service import UserCorpus
from service.inference.tokens import ChatTemplateRefused
from service.retrieval.bm25 import BM25Cache
from service.tenancy import UserRef
from tests.factories import FakeCodec, FakeEngine, migrated_sqlite, new_user, sqlite_copy

CONTEXT = 512
SPEC = BaseModelSpec("llama", "tiny", "f" * 64, {})


@dataclass
class World:
    preparer: Preparer
    engine: FakeEngine
    codec: FakeCodec
    db: Database
    settings: Settings
    alice: UserRef
    bob: UserRef

    def prepare(self, user: UserRef | None, prompt: str | tuple[ChatTurn, ...], **kw: Any) -> PreparedRequest:
        personalization = kw.pop("personalization", Personalization())
        candidates = kw.pop("candidates", ())
        spec = GenerationSpec(user, prompt, personalization, SamplingOptions(**kw), candidates)
        return self.preparer.prepare(spec)

    def publish(self, owner_key: str, user_pk: int | None, fingerprint: str = SPEC.fingerprint) -> int:
        """A new current adapter version in SQL (its files are never read while preparing)."""
        with unit_of_work(self.db.session_factory) as session:
            version = adapters_repo.allocate_version(session, owner_key, user_pk)
            adapters_repo.add(
                session,
                Adapter(
                    owner_key=owner_key,
                    user_pk=user_pk,
                    version=version,
                    sha256=f"{version:064x}",
                    rank=8,
                    alpha=16.0,
                    target_modules=["q_proj"],
                    base_model="tiny",
                    base_fingerprint=fingerprint,
                    nbytes=1,
                    source="imported",
                ),
            )
            adapters_repo.set_current(session, owner_key, version)
        return version


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_sqlite(tmp_path_factory.mktemp("prepare-db"))


@pytest.fixture
def world(template: Path, tmp_path: Path) -> Iterator[World]:
    db = sqlite_copy(template, tmp_path)
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        data_dir=tmp_path / "data",
        adapters_dir=tmp_path / "adapters",
        request_timeout_s=42.0,
        default_max_new_tokens=8,
    )
    alice, _ = new_user(db, "alice")
    bob, _ = new_user(db, "bob")
    with unit_of_work(db.session_factory) as session:
        items = [
            HistoryItemIn(id="a1", input="best pizza", output="Margherita with basil, always."),
            HistoryItemIn(id="a2", input="weekend", output="Hiking in the Alps."),
            HistoryItemIn(id="a3", output="I write short, dry reviews."),
        ]
        history.append(session, alice, HistoryAppendIn(items=items))
        history.append(session, bob, HistoryAppendIn(items=[HistoryItemIn(id="b1", output="pizza pizza pizza")]))
        history.set_profile(session, alice, "Alice likes Italian food and mountains.")
    codec = FakeCodec()
    engine = FakeEngine(EngineLimits(context_length=CONTEXT, max_continuation_tokens=16))
    bm25: BM25Cache[UserCorpus] = BM25Cache()
    store = AdapterStore(settings.adapters_dir)
    preparer = Preparer(settings, db.session_factory, bm25, store, SPEC, codec, engine)
    yield World(preparer, engine, codec, db, settings, alice, bob)
    db.engine.dispose()


def test_rows_share_one_prompt_on_the_users_tenant_with_the_request_deadline(world: World) -> None:
    before = time.monotonic()
    prepared = world.prepare(world.alice, "Say hi", n=3, seed=10, temperature=0.8)
    after = time.monotonic()
    assert len(prepared.rows) == 3
    assert prepared.request is prepared.rows[0]
    assert {r.tenant for r in prepared.rows} == {world.alice.storage_key}  # the storage key, never the user id
    assert {r.prompt_ids for r in prepared.rows} == {tuple(world.codec.encode_text("Say hi"))}
    assert len({r.request_id for r in prepared.rows}) == 3
    assert [r.sampling.seed for r in prepared.rows] == [10, 11, 12]
    (deadline,) = {r.deadline for r in prepared.rows}
    timeout = world.settings.request_timeout_s
    assert before + timeout <= deadline <= after + timeout
    assert world.engine.calls == []


def test_without_a_user_the_rows_are_the_base_tenants_and_nothing_is_personal(world: World) -> None:
    everything = Personalization(retrieval_k=3, use_profile=True, use_adapter=True)
    prepared = world.prepare(None, "pizza", personalization=everything)
    assert prepared.request.tenant == BASE_TENANT
    assert prepared.retrieved == ()
    assert (prepared.request.adapter, prepared.adapter_version) == (None, None)
    assert prepared.request.prompt_ids == tuple(world.codec.encode_text("pizza"))  # no context added
    assert world.engine.calls == []


def test_a_raw_completion_prompt_is_encoded_as_given(world: World) -> None:
    prepared = world.prepare(world.alice, "Once upon a time")
    assert prepared.request.prompt_ids == tuple(world.codec.encode_text("Once upon a time"))
    assert prepared.request.sampling.max_new_tokens == world.settings.default_max_new_tokens
    assert (prepared.retrieved, prepared.request.continuations) == ((), ())


def test_shared_carries_the_current_shared_adapter(world: World) -> None:
    assert world.prepare(world.alice, "x").request.shared is None
    world.publish(SHARED_OWNER, None)
    current = world.publish(SHARED_OWNER, None)  # the newest current version, not the first
    for user in (world.alice, None):
        prepared = world.prepare(user, "x", n=2, temperature=1.0)
        for row in prepared.rows:
            assert row.shared is not None
            assert (row.shared.owner_key, row.shared.version, row.shared.sha256) == (
                SHARED_OWNER,
                current,
                f"{current:064x}",
            )
        assert prepared.shared_version == current
    assert world.engine.calls == []  # the engine swaps the shared LoRA itself, when the row is queued


def test_the_users_own_adapter_only_when_asked(world: World) -> None:
    version = world.publish(world.alice.storage_key, world.alice.pk)
    adapter = Personalization(use_adapter=True)
    prepared = world.prepare(world.alice, "x", personalization=adapter)
    assert prepared.request.adapter is not None
    assert (prepared.request.adapter.owner_key, prepared.request.adapter.version) == (world.alice.storage_key, version)
    assert prepared.adapter_version == version
    assert world.prepare(world.alice, "x").request.adapter is None  # not asked: the base model
    assert world.prepare(world.bob, "x", personalization=adapter).request.adapter is None  # bob has none
    assert world.engine.calls == []  # nothing prefetched while preparing


def test_an_adapter_made_for_another_base_model_is_409(world: World) -> None:
    world.publish(world.bob.storage_key, world.bob.pk, fingerprint="0" * 64)
    with pytest.raises(Conflict) as info:
        world.prepare(world.bob, "x", personalization=Personalization(use_adapter=True))
    assert info.value.status == 409


def test_retrieved_items_and_the_profile_frame_the_last_user_turn_of_a_chat(world: World) -> None:
    turns = (
        ChatTurn("developer", "Be brief."),
        ChatTurn("user", "first question"),
        ChatTurn("assistant", "first answer"),
        ChatTurn("user", "any pizza tips?"),
    )
    personal = Personalization(retrieval_k=1, use_profile=True)
    prepared = world.prepare(world.alice, turns, personalization=personal)
    assert [r.id for r in prepared.retrieved] == ["a1"]  # alice's own pizza item, never bob's
    assert prepared.retrieved[0].score > 0
    text = world.codec.decode(list(prepared.request.prompt_ids))
    last_turn = (
        "<user>Here are some of this user's past items:\n- best pizza -> Margherita with basil, always.\n\n"
        "This user's profile: Alice likes Italian food and mountains.\n\n"
        "Now answer as this user would.\nany pizza tips?\n"
    )
    assert text == ("<system>Be brief.\n<user>first question\n<assistant>first answer\n" + last_turn + "<assistant>")


def test_a_chat_the_models_template_refuses_is_400_not_a_server_error(world: World) -> None:
    def refuse(messages: list[dict[str, str]]) -> list[int]:
        raise ChatTemplateRefused("the model's chat template refused these messages: System role not supported")

    world.codec.encode_chat = refuse  # type: ignore[method-assign]
    with pytest.raises(BadRequest) as info:
        world.prepare(world.alice, (ChatTurn("system", "Be brief."), ChatTurn("user", "hi")))
    assert info.value.status == 400 and "System role not supported" in info.value.message
    assert world.engine.calls == []


def test_a_prompt_too_long_is_422_before_any_engine_call(world: World) -> None:
    fits = "x" * (CONTEXT - 1 - 8)  # BOS + text + 8 new tokens = the context
    assert len(world.prepare(world.alice, fits, max_new_tokens=8).request.prompt_ids) == CONTEXT - 8
    with pytest.raises(PromptTooLong) as info:
        world.prepare(world.alice, fits + "x", max_new_tokens=8)
    assert info.value.status == 422
    assert info.value.details == {"prompt_tokens": CONTEXT - 7, "context_length": CONTEXT}
    assert world.engine.calls == []


def test_context_that_does_not_fit_goes_lowest_ranked_first_in_a_few_encodes(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt over the budget was encoded again after each dropped item (12 encodes of a 32k-character prompt
    before its 422): now the caller's text alone, then a binary search over how much context to keep."""
    query = "pizza weekend reviews"  # all three of alice's items match
    full = Personalization(retrieval_k=3, use_profile=True)
    ranked = world.prepare(world.alice, query, personalization=full, max_new_tokens=8).retrieved
    assert len(ranked) == 3

    def length(personalization: Personalization) -> int:
        return len(
            world.prepare(world.alice, query, personalization=personalization, max_new_tokens=8).request.prompt_ids
        )

    with_profile = {n: length(Personalization(retrieval_k=n, use_profile=True)) for n in range(4)}
    bare = length(Personalization(retrieval_k=0, use_profile=False))
    encodes: list[str] = []
    real_encode = world.codec.encode_text

    def counted(text: str) -> list[int]:
        encodes.append(text)
        return real_encode(text)

    monkeypatch.setattr(world.codec, "encode_text", counted)
    for kept, budget in [*((n, with_profile[n]) for n in range(4)), (None, bare)]:
        encodes.clear()
        prepared = world.prepare(world.alice, query, personalization=full, max_new_tokens=CONTEXT - budget)
        text = world.codec.decode(list(prepared.request.prompt_ids))
        assert prepared.retrieved == ranked[: kept or 0] and ("profile" in text) == (kept is not None)
        assert len(prepared.request.prompt_ids) == budget and len(encodes) <= 4  # full, bare, then log2(5) at most
    encodes.clear()
    with pytest.raises(PromptTooLong):
        world.prepare(world.alice, query, personalization=full, max_new_tokens=CONTEXT - bare + 1)
    assert len(encodes) == 2  # the caller's text alone does not fit: refused at once


def test_scoring_prefills_only_and_encodes_each_candidate_as_a_continuation(world: World) -> None:
    prepared = world.prepare(world.alice, "Rate it:", candidates=("4", "4.5"))
    row = prepared.request
    assert row.sampling.max_new_tokens == 0
    assert row.continuations == (tuple(world.codec.ids("4")), tuple(world.codec.ids("4.5")))
    assert len(prepared.rows) == 1
    too_long = "9" * 17  # limits.max_continuation_tokens is 16
    with pytest.raises(PromptTooLong, match="continuation"):
        world.prepare(world.alice, "Rate it:", candidates=("4", too_long))
    assert world.engine.calls == []


def test_stop_strings_go_to_the_text_cut(world: World) -> None:
    assert world.prepare(world.alice, "x", stop=("\n\n", "END")).stop == ("\n\n", "END")


def test_a_tenant_without_queue_room_is_refused_before_its_history_is_searched(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user whose queue share is used up gets 429 before retrieval: a flood of their requests costs no BM25
    pass over their history each (the queue check used to come after it)."""

    def full(tenant: str, rows: int) -> None:
        raise TooManyRequests("your queue share is full")

    searched: list[str] = []
    real = history.retrieve

    def retrieve(*args: Any, **kwargs: Any) -> Any:
        searched.append("searched")
        return real(*args, **kwargs)

    monkeypatch.setattr(world.engine, "check_room", full)
    monkeypatch.setattr(history, "retrieve", retrieve)
    with pytest.raises(TooManyRequests):
        world.prepare(world.alice, "best pizza", personalization=Personalization(retrieval_k=2))
    assert searched == []
