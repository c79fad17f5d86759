"""The history repository and service on SQLite and PostgreSQL: per-user SQL, idempotent inserts,
ordering, profile upsert, and the BM25 cache keyed by user and invalidated by the history stamp."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.adapters.store import AdapterStore
from service.db.models import HistoryItem
from service.db.session import Database, make_engine, make_session_factory, unit_of_work
from service.history import repository as repo
from service.history import service
from service.history.schemas import HistoryAppendIn, HistoryItemIn
from service.history.service import UserCorpus
from service.retrieval.bm25 import BM25Cache
from service.retrieval.tokenize import terms
from service.sealing.cipher import token_version
from service.sealing.kek import LocalKeyset
from service.sealing.models import KeyringBase
from service.sealing.operations import rotate_user
from service.sealing.service import Sealer, tag_version
from service.sealing.session import seal_of, session_info
from service.tenancy import UserRef
from service.users import create_user, delete_user_rows
from tests.factories import make_sealer


@pytest.fixture
def factory(db_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions that seal, as the composition root builds them (the repository's sealed path)."""
    engine = make_engine(db_url)
    yield make_session_factory(engine, session_info(make_sealer(tmp_path / "keyring")))
    engine.dispose()


def new_user(factory: sessionmaker[Session], user_id: str) -> UserRef:
    with unit_of_work(factory) as session:
        user, _ = create_user(session, user_id)
    return user


def rows(*ids: str, text: str = "output") -> list[dict[str, object]]:
    now = datetime.now(UTC)
    return [
        {
            "client_id": i,
            "input": None,
            "output": f"{text} {i}",
            "kind": None,
            "meta": None,
            "timestamp": None,
            "created_at": now,
        }
        for i in ids
    ]


def body(*outputs: str, ids: list[str | None] | None = None) -> HistoryAppendIn:
    client_ids = ids or [None] * len(outputs)
    return HistoryAppendIn(items=[HistoryItemIn(id=i, output=o) for i, o in zip(client_ids, outputs, strict=True)])


def test_insert_ignores_duplicates_per_user(factory: sessionmaker[Session]) -> None:
    alice, bob = new_user(factory, "alice"), new_user(factory, "bob")
    with unit_of_work(factory) as s:
        assert len(repo.insert_items_ignore_duplicates(s, alice, rows("a", "b", "c"))) == 3
        assert len(repo.insert_items_ignore_duplicates(s, alice, rows("b", "c", "d"))) == 1
        assert len(repo.insert_items_ignore_duplicates(s, bob, rows("a"))) == 1  # other user: not a duplicate
        assert len(repo.insert_items_ignore_duplicates(s, alice, [])) == 0
    with unit_of_work(factory) as s:
        assert repo.count_items(s, alice.pk) == 4 and repo.count_items(s, bob.pk) == 1
        assert [i.client_id for i in repo.all_items(s, alice)] == ["a", "b", "c", "d"]
        assert [i.client_id for i in repo.all_items(s, bob)] == ["a"]


def test_insert_a_full_batch_with_repeats(factory: sessionmaker[Session]) -> None:
    alice = new_user(factory, "alice")
    ids = [f"id{i}" for i in range(1000)]
    with unit_of_work(factory) as s:
        assert len(repo.insert_items_ignore_duplicates(s, alice, rows(*ids))) == 1000
        # Repeats inside one call count once; the first row wins.
        assert len(repo.insert_items_ignore_duplicates(s, alice, rows("new", "new", "id5", text="again"))) == 1
    with unit_of_work(factory) as s:
        assert repo.count_items(s, alice.pk) == 1001
        items = {i.client_id: i.output for i in repo.all_items(s, alice)}
        assert items["new"] == "again new" and items["id5"] == "output id5"


def test_existing_client_ids_in_chunks(factory: sessionmaker[Session]) -> None:
    alice, bob = new_user(factory, "alice"), new_user(factory, "bob")
    ids = [f"id{i}" for i in range(1200)]
    with unit_of_work(factory) as s:
        repo.insert_items_ignore_duplicates(s, alice, rows(*ids[::2]))
        repo.insert_items_ignore_duplicates(s, bob, rows(*ids[1::2]))
    with unit_of_work(factory) as s:
        assert repo.existing_client_ids(s, alice, ids) == set(ids[::2])
        assert repo.existing_client_ids(s, bob, ids[:10]) == set(ids[1:10:2])
        assert repo.existing_client_ids(s, alice, []) == set()


def test_list_items_pages_by_id(factory: sessionmaker[Session]) -> None:
    alice, bob = new_user(factory, "alice"), new_user(factory, "bob")
    with unit_of_work(factory) as s:
        repo.insert_items_ignore_duplicates(s, alice, rows("a", "b"))
        repo.insert_items_ignore_duplicates(s, bob, rows("x"))  # interleaved ids of another user
        repo.insert_items_ignore_duplicates(s, alice, rows("c", "d", "e"))
    with unit_of_work(factory) as s:
        first = repo.list_items(s, alice, after_id=0, limit=2)
        assert [i.client_id for i in first] == ["a", "b"]
        rest = repo.list_items(s, alice, after_id=first[-1].id, limit=10)
        assert [i.client_id for i in rest] == ["c", "d", "e"]
        assert repo.list_items(s, alice, after_id=rest[-1].id, limit=10) == []
        upto = repo.all_items(s, alice, up_to_id=rest[0].id)
        assert [i.client_id for i in upto] == ["a", "b", "c"]
        assert repo.max_item_id(s, alice.pk) == rest[-1].id
        assert repo.max_item_id(s, new_user(factory, "nobody").pk) is None


def test_iter_items_reads_every_item_of_the_user_a_page_at_a_time(factory: sessionmaker[Session]) -> None:
    alice, bob = new_user(factory, "alice"), new_user(factory, "bob")
    with unit_of_work(factory) as s:
        repo.insert_items_ignore_duplicates(s, alice, rows("a", "b"))
        repo.insert_items_ignore_duplicates(s, bob, rows("x", "y", "z"))  # interleaved ids of another user
        repo.insert_items_ignore_duplicates(s, alice, rows("c", "d", "e"))
    with unit_of_work(factory) as s:
        for page in (1, 2, 5, 500):
            assert list(repo.iter_items(s, alice, page=page)) == repo.all_items(s, alice)
        assert list(repo.iter_items(s, new_user(factory, "nobody"))) == []


def test_delete_items_and_user_rows(factory: sessionmaker[Session]) -> None:
    alice, bob = new_user(factory, "alice"), new_user(factory, "bob")
    with unit_of_work(factory) as s:
        repo.insert_items_ignore_duplicates(s, alice, rows("a", "b"))
        repo.insert_items_ignore_duplicates(s, bob, rows("a"))
        repo.upsert_profile(s, alice, "p", "user")
    with unit_of_work(factory) as s:
        repo.delete_items(s, alice.pk)
    with unit_of_work(factory) as s:
        assert repo.count_items(s, alice.pk) == 0 and repo.count_items(s, bob.pk) == 1
        assert repo.get_profile(s, alice) is not None
        delete_user_rows(s, alice)
    with unit_of_work(factory) as s:
        assert repo.get_profile(s, alice) is None  # cascaded
        assert repo.count_items(s, bob.pk) == 1


def test_profile_upsert(factory: sessionmaker[Session]) -> None:
    alice = new_user(factory, "alice")
    with unit_of_work(factory) as s:
        assert repo.get_profile(s, alice) is None
        assert service.profile_text(s, alice) is None
        repo.upsert_profile(s, alice, "first", "user")
    with unit_of_work(factory) as s:
        repo.upsert_profile(s, alice, "second", "generated")
    with unit_of_work(factory) as s:
        out = service.get_profile(s, alice)
        assert (out.text, out.source) == ("second", "generated")
        assert out.updated_at.tzinfo is not None
        service.set_profile(s, alice, "   ")
        assert service.profile_text(s, alice) is None  # blank profiles are not put in prompts


def test_append_service_counts_and_ids(factory: sessionmaker[Session]) -> None:
    alice = new_user(factory, "alice")
    with unit_of_work(factory) as s:
        out = service.append(s, alice, body("one", "two", "dup", "free", ids=["1", "2", "1", None]))
    assert (out.added, out.duplicates) == (3, 1)
    assert out.ids[:3] == ["1", "2", "1"] and out.ids[3].startswith("h_")


def test_timestamps_come_back_in_utc(factory: sessionmaker[Session]) -> None:
    alice = new_user(factory, "alice")
    plus2 = timezone(timedelta(hours=2))
    item = HistoryItemIn(id="t", output="o", timestamp=datetime(2024, 5, 1, 12, 0, tzinfo=plus2))
    naive = HistoryItemIn(id="n", output="o", timestamp=datetime(2024, 5, 1, 12, 0))
    with unit_of_work(factory) as s:
        service.append(s, alice, HistoryAppendIn(items=[item, naive]))
    with unit_of_work(factory) as s:
        got = service.page(s, alice, limit=10, cursor=None).items
    assert got[0].timestamp == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert got[1].timestamp == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert all(i.created_at.tzinfo is not None for i in got)


def test_retrieve_uses_only_the_users_items(factory: sessionmaker[Session]) -> None:
    alice, bob = new_user(factory, "alice"), new_user(factory, "bob")
    cache = BM25Cache[UserCorpus](8)
    with unit_of_work(factory) as s:
        service.append(s, alice, body("i like green tea", "mountain bikes are fun", ids=["a1", "a2"]))
        service.append(s, bob, body("green tea green tea green tea", ids=["b1"]))
    with unit_of_work(factory) as s:
        hits = service.retrieve(s, alice, "green tea", 5, cache)
        assert [h.doc.id for h in hits] == ["a1"]
        assert [h.doc.id for h in service.retrieve(s, bob, "green tea", 5, cache)] == ["b1"]
        assert service.retrieve(s, alice, "green tea", 0, cache) == []
        assert service.retrieve(s, new_user(factory, "empty"), "green tea", 5, cache) == []


def test_bm25_cache_hit_and_invalidation_by_stamp(factory: sessionmaker[Session]) -> None:
    alice, bob = new_user(factory, "alice"), new_user(factory, "bob")
    cache = BM25Cache[UserCorpus](8)
    with unit_of_work(factory) as s:
        service.append(s, alice, body("red apples", ids=["r"]))
        service.append(s, bob, body("red apples", ids=["r"]))
    with unit_of_work(factory) as s:
        a1 = service.user_corpus(s, alice, cache)
        assert service.user_corpus(s, alice, cache) is a1  # cached: same stamp
        b1 = service.user_corpus(s, bob, cache)
        assert b1 is not a1  # per-user entries
    with unit_of_work(factory) as s:  # an append changes the stamp (count, max id): rebuilt
        service.append(s, alice, body("green pears", ids=["g"]))
    with unit_of_work(factory) as s:
        a2 = service.user_corpus(s, alice, cache)
        assert a2 is not a1 and [d.id for d in a2.docs] == ["r", "g"]
        assert service.user_corpus(s, bob, cache) is b1  # Bob's entry untouched
        assert [h.doc.id for h in service.retrieve(s, alice, "pears", 3, cache)] == ["g"]
    # Deleting and re-adding the same number of items changes max id, so the stamp still moves.
    with unit_of_work(factory) as s:
        repo.delete_items(s, alice.pk)
        service.append(s, alice, body("blue plums", "x", ids=["p", "q"]))
    with unit_of_work(factory) as s:
        a3 = service.user_corpus(s, alice, cache)
        assert a3 is not a2 and [d.id for d in a3.docs] == ["p", "q"]


def test_an_append_extends_the_cached_index_with_the_new_items_only(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an append, the cached index is extended (only the new items are read and tokenized), and it
    retrieves exactly what an index built from scratch over the whole history does."""
    import service.retrieval.bm25 as bm25_module

    alice = new_user(factory, "alice")
    cache = BM25Cache[UserCorpus](8)
    words = ["green tea", "black tea", "mountain bikes", "red apples", "tea and apples"]
    with unit_of_work(factory) as s:
        service.append(s, alice, body(*(f"{words[i % 5]} {i}" for i in range(40))))
    with unit_of_work(factory) as s:
        before = service.user_corpus(s, alice, cache)
    tokenized: list[str] = []

    def counting_terms(text: str) -> list[str]:
        tokenized.append(text)
        return terms(text)

    monkeypatch.setattr(bm25_module, "terms", counting_terms)
    with unit_of_work(factory) as s:
        service.append(s, alice, body("green apples 40", "tea tea tea 41", ids=["n1", "n2"]))
    with unit_of_work(factory) as s:
        after = service.user_corpus(s, alice, cache)
    assert [t.strip() for t in tokenized] == ["green apples 40", "tea tea tea 41"]
    assert after.stamp[0] == 42 and len(after.docs) == 42 and after.docs[:40] == before.docs
    fresh = BM25Cache[UserCorpus](8)
    with unit_of_work(factory) as s:
        for query in ("tea", "green apples", "mountain tea 41", "bikes 3"):
            got = [(h.doc.id, h.score) for h in service.retrieve(s, alice, query, 5, cache)]
            assert got == [(h.doc.id, h.score) for h in service.retrieve(s, alice, query, 5, fresh)]
    assert cache.nbytes == after.nbytes > before.nbytes


def test_the_index_keeps_the_most_recent_window_chars(factory: sessionmaker[Session]) -> None:
    """With a window, a cold build and an extended index keep only the newest items whose characters fit;
    older ones are never retrieved."""
    alice = new_user(factory, "alice")
    cache = BM25Cache[UserCorpus](8, window_chars=30)
    with unit_of_work(factory) as s:  # 10 characters each
        service.append(s, alice, body("tea  one  ", "tea  two  ", "tea three ", "tea  four ", ids=list("abcd")))
    with unit_of_work(factory) as s:
        assert [d.id for d in service.user_corpus(s, alice, cache).docs] == ["b", "c", "d"]
        assert [h.doc.id for h in service.retrieve(s, alice, "tea one", 5, cache)] == ["d", "c", "b"]
        service.append(s, alice, body("tea  five ", ids=["e"]))
    with unit_of_work(factory) as s:
        corpus = service.user_corpus(s, alice, cache)
        assert [d.id for d in corpus.docs] == ["c", "d", "e"] and corpus.stamp[0] == 5
        assert [h.doc.id for h in service.retrieve(s, alice, "two five", 5, cache)] == ["e"]
        cold = service.user_corpus(s, alice, BM25Cache[UserCorpus](8, window_chars=30))
        assert cold.docs == corpus.docs and cold.stamp == corpus.stamp


@pytest.fixture
def replicas(tmp_path: Path, db_url: str) -> Iterator[tuple[Sealer, sessionmaker[Session], sessionmaker[Session]]]:
    """Replicas a and b: two Sealers over one keyring (b caches its keys for an hour and never hears a notice),
    each with its sessions on the one database; (a's sealer, a's sessions, b's sessions)."""
    keyring = Database.open(f"sqlite:///{tmp_path / 'keyring.sqlite3'}")
    KeyringBase.metadata.create_all(keyring.engine)
    keks = LocalKeyset(inline=os.urandom(32))
    a, b = (Sealer(keyring.session_factory, keks, recheck_s=3600.0) for _ in range(2))
    engine = make_engine(db_url)
    yield a, make_session_factory(engine, session_info(a)), make_session_factory(engine, session_info(b))
    engine.dispose()
    keyring.dispose()


def test_an_append_on_a_replica_that_missed_a_rotation_stays_one_row_after_it(
    tmp_path: Path, replicas: tuple[Sealer, sessionmaker[Session], sessionmaker[Session]]
) -> None:
    # The sealing review's reproduction: replica b cached version 1; the rotation made version 2; b's append
    # hashed the client id under its cached version 1 BEFORE its lookup refreshed the keyring, then sealed the
    # row under version 2. The sweep skipped the row (its token is current), version 1 was destroyed, and a
    # retry of the same id no longer matched the row: stored twice.
    sealer_a, factory_a, factory_b = replicas
    alice = new_user(factory_a, "alice")
    with unit_of_work(factory_b) as s:
        assert repo.insert_items_ignore_duplicates(s, alice, rows("before")) == {"before"}  # b caches version 1

    def append_through_b(_fraction: float) -> None:
        if _fraction == 0.05:  # once: after the new version and its notice (which b never hears)
            with unit_of_work(factory_b) as s:
                assert repo.insert_items_ignore_duplicates(s, alice, rows("mid")) == {"mid"}
            with unit_of_work(factory_b) as s:  # before any sweep: token and hash under the new version alike
                newest = s.scalars(
                    select(HistoryItem).where(HistoryItem.user_pk == alice.pk).order_by(HistoryItem.id.desc()).limit(1)
                ).one()
                assert newest.sealed is not None
                assert (token_version(newest.sealed), tag_version(newest.client_id)) == (2, 2)

    owner = repo.OwnerRef(alice.pk, alice.storage_key)
    rotate_user(
        factory_a, AdapterStore(tmp_path / "adapters"), sealer_a, owner, settle_s=0.0, progress=append_through_b
    )
    assert sealer_a.live_versions(alice.storage_key) == [2]
    for factory in (factory_a, factory_b):  # the retry, on either replica, finds the row
        with unit_of_work(factory) as s:
            assert repo.insert_items_ignore_duplicates(s, alice, rows("mid", "before")) == set()
    with unit_of_work(factory_a) as s:
        assert [i.client_id for i in repo.all_items(s, alice)] == ["before", "mid"]


def test_the_reseal_sweep_remakes_a_row_whose_client_id_hash_is_under_an_old_version(
    factory: sessionmaker[Session],
) -> None:
    # A row sealed under the current version but its client id hashed under an older one (written that way
    # before the fix above) was skipped by the sweep; once the old version was destroyed its id matched nothing.
    alice = new_user(factory, "alice")
    with unit_of_work(factory) as s:
        repo.insert_items_ignore_duplicates(s, alice, rows("c1"))
        seal = seal_of(s, alice.storage_key)
        old_tag = seal.tag("c1")
        seal.sealer.rotate_user(alice.storage_key)
        item = s.scalars(select(HistoryItem).where(HistoryItem.user_pk == alice.pk)).one()
        repo._seal_in_place(seal, item)  # token and hash under version 2 ...
        item.client_id = old_tag  # ... but the hash as version 1 made it
    with unit_of_work(factory) as s:
        assert repo.reseal(s, alice) == 1
    seal.sealer.drop_versions_below(alice.storage_key, 2)
    with unit_of_work(factory) as s:
        assert repo.insert_items_ignore_duplicates(s, alice, rows("c1")) == set()
        assert [i.client_id for i in repo.all_items(s, alice)] == ["c1"]
