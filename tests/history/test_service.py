"""history/service's per-user index: extended after appends, built whole (paged, windowed) otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import make_engine, make_session_factory, unit_of_work
from service.history import repository as repo
from service.history import service
from service.history.schemas import HistoryAppendIn, HistoryItemIn
from service.history.service import UserCorpus
from service.retrieval.bm25 import BM25Cache, BM25Index
from service.sealing.service import UserDataErased
from service.sealing.session import session_info
from service.tenancy import UserRef
from service.users import create_user, delete_user_rows
from tests.factories import make_sealer


@pytest.fixture
def factory(db_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_session_factory(engine, session_info(make_sealer(tmp_path / "keyring")))
    engine.dispose()


def _body(*outputs: str) -> HistoryAppendIn:
    return HistoryAppendIn(items=[HistoryItemIn(output=o) for o in outputs])


def _cached_user(factory: sessionmaker[Session], cache: BM25Cache[UserCorpus], n: int) -> UserRef:
    with unit_of_work(factory) as s:
        alice, _ = create_user(s, "alice")
    with unit_of_work(factory) as s:
        service.append(s, alice, _body(*(f"green tea {i}" for i in range(n))))
    with unit_of_work(factory) as s:
        service.user_corpus(s, alice, cache)
    return alice


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    builds: list[object] = []
    real_build = service._build_corpus

    def counting_build(*args: Any, **kwargs: Any) -> UserCorpus:
        builds.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(service, "_build_corpus", counting_build)
    return builds


def test_an_append_committed_while_the_stamp_is_read_does_not_force_a_whole_rebuild(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The appended-only check counted items past the old max id with no upper bound, in a later statement
    # than the stamp: an append committing in between made the counts differ and the index was rebuilt whole.
    cache = BM25Cache[UserCorpus](8)
    alice = _cached_user(factory, cache, 40)
    with unit_of_work(factory) as s:
        service.append(s, alice, _body("new item one"))
    real_stamp = repo.history_stamp

    def stamp_then_concurrent_append(session: Session, user_pk: int) -> tuple[int, int]:
        stamp = real_stamp(session, user_pk)
        with unit_of_work(factory) as other:
            service.append(other, alice, _body("another concurrent item"))
        return stamp

    monkeypatch.setattr(repo, "history_stamp", stamp_then_concurrent_append)
    builds = _count_builds(monkeypatch)
    with unit_of_work(factory) as s:
        corpus = service.user_corpus(s, alice, cache)
    assert corpus.stamp[0] == 41 and builds == []


def test_many_new_items_are_read_by_a_whole_build_not_one_unbounded_extension(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Extending read every item appended since the cached stamp in one query (up to a user's whole quota,
    # ~0.5 GB in one request); a whole build reads pages and keeps only its window.
    monkeypatch.setattr(service, "EXTEND_MAX_ITEMS", 5)
    cache = BM25Cache[UserCorpus](8)
    alice = _cached_user(factory, cache, 3)
    with unit_of_work(factory) as s:
        service.append(s, alice, _body("one more", "and another"))
    builds = _count_builds(monkeypatch)
    with unit_of_work(factory) as s:
        assert service.user_corpus(s, alice, cache).stamp[0] == 5
    assert builds == []  # 2 new: extended
    with unit_of_work(factory) as s:
        service.append(s, alice, _body(*(f"black tea {i}" for i in range(6))))
    with unit_of_work(factory) as s:
        assert service.user_corpus(s, alice, cache).stamp[0] == 11
    assert len(builds) == 1  # 6 new: built whole


def test_a_corpus_counts_the_memory_of_its_text_not_its_characters() -> None:
    # CPython keeps text beyond Latin-1 at 2 or 4 bytes a character: counting characters undercounted emoji text
    # 3.9x, so the cache's byte budget held ~4x what it was set to.
    emoji = [service.DocSnapshot(id=f"e{i}", input="🙂" * 5_000, output="🎉" * 5_000, kind=None) for i in range(4)]
    corpus = UserCorpus(emoji, BM25Index(emoji))
    held = sum(sys.getsizeof(s) for d in emoji for s in (d.id, d.input, d.output))
    assert corpus.text_bytes >= held >= 4 * 40_000
    ascii_docs = [service.DocSnapshot(id=f"a{i}", input=None, output="tea " * 2_500, kind="k") for i in range(4)]
    extended = UserCorpus(ascii_docs, BM25Index(ascii_docs)).extended(emoji, 99)
    assert extended.text_bytes == UserCorpus(extended.docs, extended.index).text_bytes >= held


def _window_of(docs: list[service.DocSnapshot], window_chars: int) -> list[service.DocSnapshot]:
    """The reference: the longest run of newest docs whose characters fit the window (at least the newest one)."""
    kept: list[service.DocSnapshot] = []
    chars = 0
    for doc in reversed(docs):
        chars += len(doc.input or "") + len(doc.output)
        if kept and chars > window_chars:
            break
        kept.append(doc)
    return kept[::-1]


def test_a_cold_build_reads_only_the_newest_window(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cold build read and decrypted the user's whole history (100k items: 13.5 s) to keep its newest
    # window_chars; it reads newest first now, until the window is full, and builds the same corpus.
    with unit_of_work(factory) as s:
        alice, _ = create_user(s, "alice")
    texts = [f"{'green' if i % 3 else 'black'} tea number {i} " + "x" * (i % 17) for i in range(3_000)]
    for start in range(0, len(texts), 1_000):
        with unit_of_work(factory) as s:
            service.append(s, alice, _body(*texts[start : start + 1_000]))
    with unit_of_work(factory) as s:
        every = [service.snapshot(i) for i in repo.all_items(s, alice)]
        stamp = repo.history_stamp(s, alice.pk)
    opened: list[int] = []
    real_record = repo._record

    def counting_record(seal: Any, item: Any) -> repo.HistoryRecord:
        opened.append(item.id)
        return real_record(seal, item)

    monkeypatch.setattr(repo, "_record", counting_record)
    for window in (1_000, 25_000):
        opened.clear()
        cache = BM25Cache[UserCorpus](8, window_chars=window)
        with unit_of_work(factory) as s:
            corpus = service.user_corpus(s, alice, cache)
        expected = _window_of(every, window)
        assert corpus.docs == expected and corpus.stamp == stamp
        reference = UserCorpus(expected, BM25Index(expected, max_chars=window))
        assert corpus.index.top_k("black tea 2999", 5) == reference.index.top_k("black tea 2999", 5)
        assert corpus.text_bytes == reference.text_bytes
        assert len(expected) < len(opened) <= 2 * len(expected) + 128, (len(expected), len(opened))
    with unit_of_work(factory) as s:  # no window: every item
        assert service.user_corpus(s, alice, BM25Cache[UserCorpus](8)).docs == every


@pytest.fixture
def plaintext_factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions that do not seal (OPPU_SEAL_AT_REST=false)."""
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.mark.parametrize("sealing", [False, True])
def test_a_write_after_an_erase_committed_is_410_not_a_500(
    sealing: bool, factory: sessionmaker[Session], plaintext_factory: sessionmaker[Session]
) -> None:
    # Not sealing, an append or a profile PUT whose user was resolved before an erase committed inserted a row
    # referencing the deleted user: an IntegrityError (foreign key) and a 500, on both databases. (Sealing, the
    # erase's shredded keys answer 410 first; here the rows go without the shred, so the insert meets it too.)
    sessions = factory if sealing else plaintext_factory
    with unit_of_work(sessions) as s:
        alice, _ = create_user(s, "alice")
        service.set_profile(s, alice, "before the erase")  # a sealing replica has the keys cached
    with unit_of_work(sessions) as s:
        delete_user_rows(s, alice)  # the erase commits after the request resolved alice
    writes = (
        lambda s: service.append(s, alice, _body("after the erase")),
        lambda s: service.set_profile(s, alice, "after the erase"),
    )
    for write in writes:
        with pytest.raises(UserDataErased) as info, unit_of_work(sessions) as s:
            write(s)
        assert info.value.status == 410 and info.value.code == "user_data_erased"
