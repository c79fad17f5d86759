"""History and profile use cases: append (idempotent per client id), page, retrieve (BM25), profile.

Services never commit: the caller's unit of work does.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import NotFound, QuotaExceeded, Unprocessable
from service.history import repository as repo
from service.history.repository import HistoryRecord
from service.history.schemas import (
    HistoryAppendIn,
    HistoryAppendOut,
    HistoryItemOut,
    HistoryPage,
    ProfileOut,
)
from service.retrieval.bm25 import BM25Cache, BM25Index, doc_chars
from service.tenancy import UserRef

_BUILD_PAGE = 2_000  # items read per query when an index is built whole (at most)
_FIRST_BATCH = 128  # a whole build's first query (newest first); each next one reads twice as many
EXTEND_MAX_ITEMS = _BUILD_PAGE  # new items an index is extended by at once; more: built whole (paged, windowed)
_DOC_BYTES = 200  # estimated memory of one cached doc besides its strings (snapshot object, list slot)


@dataclass(frozen=True)
class DocSnapshot:
    """A history item as retrieval and prompts see it (detached from the session)."""

    id: str
    input: str | None
    output: str
    kind: str | None


@dataclass(frozen=True)
class UserCorpus:
    """A user's BM25 index and the docs it keeps (hit i is docs[i]), built from their history up to `stamp`
    (count, max id): a later stamp whose new items all come after it extends this corpus."""

    docs: list[DocSnapshot]
    index: BM25Index
    stamp: tuple[int, int] = (0, 0)
    text_bytes: int = -1  # estimated memory of the docs (computed when not given)

    def __post_init__(self) -> None:
        if self.text_bytes < 0:
            object.__setattr__(self, "text_bytes", _docs_bytes(self.docs))

    @property
    def nbytes(self) -> int:
        """Estimated memory: the index plus the kept docs."""
        return self.index.nbytes + self.text_bytes

    def extended(self, items: list[DocSnapshot], last_id: int) -> UserCorpus:
        """This corpus with `items` (the next ones in append order, the last with pk `last_id`) added."""
        if not items:
            return self
        index = self.index.extended(items)
        both = self.docs + items
        dropped = index.first - self.index.first  # docs that left the window
        text_bytes = self.text_bytes + _docs_bytes(items) - _docs_bytes(both[:dropped])
        return UserCorpus(both[dropped:], index, (self.stamp[0] + len(items), last_id), text_bytes)


def _docs_bytes(docs: list[DocSnapshot]) -> int:
    """Estimated memory of the docs: their strings' real sizes (CPython keeps a str at 1, 2 or 4 bytes a
    character, by its widest one: counting characters undercounted emoji text ~4x) plus _DOC_BYTES each."""
    return sum(_DOC_BYTES + sum(sys.getsizeof(s) for s in (d.id, d.input, d.output, d.kind) if s) for d in docs)


@dataclass(frozen=True)
class RetrievedDoc:
    doc: DocSnapshot
    score: float


@dataclass(frozen=True)
class HistoryQuota:
    """Per user: history items and characters (input + output) kept. BM25 holds a user's history in memory."""

    max_items: int
    max_chars: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HistoryQuota:
        return cls(settings.history_max_items_per_user, settings.history_max_chars_per_user)


UNLIMITED = HistoryQuota(2**31 - 1, 2**62)  # internal callers (the evaluation) that own their data


def append(session: Session, user: UserRef, body: HistoryAppendIn, quota: HistoryQuota = UNLIMITED) -> HistoryAppendOut:
    """Insert the new items (a client id already there is a duplicate, skipped) within the user's quota:
    409 quota_exceeded and nothing stored when they would not fit."""
    ids, rows, chars = _rows(body)
    inserted = repo.insert_items_ignore_duplicates(session, user, rows)
    _charge(session, user, len(inserted), sum(chars[i] for i in inserted), quota)
    return HistoryAppendOut(added=len(inserted), duplicates=len(body.items) - len(inserted), ids=ids)


def _rows(body: HistoryAppendIn) -> tuple[list[str], list[dict[str, object]], dict[str, int]]:
    """(client id of every item, the rows to insert (the same id twice in one request counts once), the
    characters of each row by client id)."""
    ids: list[str] = []
    rows: list[dict[str, object]] = []
    chars: dict[str, int] = {}
    for item in body.items:
        client_id = item.id or f"h_{uuid.uuid4().hex}"
        ids.append(client_id)
        if client_id in chars:
            continue
        # Metadata counts too: up to 16 KiB an item, uncounted it let 100k one-character items take ~2 GiB.
        meta = len(json.dumps(item.metadata, ensure_ascii=False, default=str)) if item.metadata is not None else 0
        chars[client_id] = len(item.input or "") + len(item.output) + meta
        rows.append(
            {
                "client_id": client_id,
                "input": item.input,
                "output": item.output,
                "kind": item.kind,
                "meta": item.metadata,
                "timestamp": as_utc(item.timestamp) if item.timestamp is not None else None,
                "created_at": datetime.now(UTC),
            }
        )
    return ids, rows, chars


def _charge(session: Session, user: UserRef, items: int, chars: int, quota: HistoryQuota) -> None:
    if items and not repo.charge_quota(session, user.pk, items, chars, quota.max_items, quota.max_chars):
        stored, used = repo.quota_use(session, user.pk)
        raise QuotaExceeded(
            f"history quota exceeded: {stored} items and {used} characters stored, this adds {items} and "
            f"{chars}; the limits are {quota.max_items} items and {quota.max_chars} characters",
            details={"items": stored, "chars": used, "max_items": quota.max_items, "max_chars": quota.max_chars},
        )


def as_utc(value: datetime) -> datetime:
    """Aware UTC. Naive input is taken as UTC; SQLite keeps no offset, so values are stored in UTC and
    read back naive (PostgreSQL returns them aware): both come out the same."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


PAGE_MAX_BYTES = 8 * 1024 * 1024  # a history page stops before its items' JSON passes this (at least one item)
_PAGE_CHUNK = 100  # items a page reads and opens at once
MAX_ITEM_ID = 2**31 - 1  # history_items.id is a 32-bit integer column: larger is no id (PostgreSQL would refuse it)


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"h:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, value = raw.partition(":")
        if tag != "h" or not value.isdigit() or len(value) > 18 or int(value) > MAX_ITEM_ID:
            raise ValueError(raw)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise Unprocessable("invalid cursor") from exc


def _item_out(item: HistoryRecord) -> HistoryItemOut:
    return HistoryItemOut(
        id=item.client_id,
        input=item.input,
        output=item.output,
        kind=item.kind,
        metadata=item.meta,
        timestamp=as_utc(item.timestamp) if item.timestamp is not None else None,
        created_at=as_utc(item.created_at),
    )


def page(session: Session, user: UserRef, *, limit: int, cursor: str | None) -> HistoryPage:
    """Up to `limit` items after the cursor, fewer when their JSON would pass PAGE_MAX_BYTES (at least one item:
    1,000 items of 20,000 emoji input and output made ~150 MiB of JSON); `next_cursor` then goes on from the last
    one. Read in chunks, so the rows past the budget are not read and opened."""
    after, out, size = _decode_cursor(cursor), list[HistoryItemOut](), 0
    while True:
        want = min(limit - len(out), _PAGE_CHUNK)
        rows = repo.list_items(session, user, after_id=after, limit=want + 1)  # one more: is there a next page?
        for row in rows[:want]:
            item = _item_out(row)
            size += len(item.__pydantic_serializer__.to_json(item))  # bytes, as the response sends them
            if out and size > PAGE_MAX_BYTES:
                return HistoryPage(items=out, next_cursor=_encode_cursor(after))
            out.append(item)
            after = row.id
        if len(rows) <= want:
            return HistoryPage(items=out, next_cursor=None)
        if len(out) == limit:
            return HistoryPage(items=out, next_cursor=_encode_cursor(after))


def snapshot(item: HistoryRecord) -> DocSnapshot:
    return DocSnapshot(id=item.client_id, input=item.input, output=item.output, kind=item.kind)


def user_corpus(session: Session, user: UserRef, cache: BM25Cache[UserCorpus]) -> UserCorpus:
    """The user's BM25 index for their current history (in any replica): cached; after appends, the cached
    index is extended with the new items only; built whole (over the most recent `cache.window_chars`
    characters) only when none is cached or items were removed."""
    since = cache.token()  # before the history is read: an erase after this keeps what we build out of the cache
    stamp = repo.history_stamp(session, user.pk)
    corpus = cache.get(user.storage_key, stamp)
    if corpus is not None:
        return corpus
    with cache.building(user.storage_key):  # concurrent requests of one user build it once
        cached = cache.peek(user.storage_key)
        base = cached[1] if cached is not None else None
        if base is not None and base.stamp[0] >= stamp[0] and base.stamp[1] >= stamp[1]:
            return base  # built meanwhile by another request, from this history or a later one
        if base is not None and _appended_only(session, user, base.stamp, stamp):
            corpus = base.extended(*_items(session, user, base.stamp[1], stamp))
        else:
            corpus = _build_corpus(session, user, stamp, cache.window_chars)
        cache.put(user.storage_key, corpus.stamp, corpus, corpus.nbytes, since=since)
    return corpus


def _appended_only(session: Session, user: UserRef, old: tuple[int, int], new: tuple[int, int]) -> bool:
    """Every item under the `old` stamp is still there and the others came after it: pks are never reused
    and only an erase removes items, so the count of items between the two max ids tells. More than
    EXTEND_MAX_ITEMS new items: False (a whole build reads them in pages and keeps only its window)."""
    (old_count, old_max), (count, max_id) = old, new
    return (
        count > old_count
        and max_id > old_max
        and count - old_count <= EXTEND_MAX_ITEMS
        and repo.count_items_after(session, user.pk, old_max, max_id) == count - old_count
    )


def _items(session: Session, user: UserRef, after_id: int, stamp: tuple[int, int]) -> tuple[list[DocSnapshot], int]:
    """The items after `after_id` up to the stamp's max id (not those committed since it was read), and the
    pk of the last one."""
    items = [i for i in repo.list_items(session, user, after_id=after_id, limit=stamp[0]) if i.id <= stamp[1]]
    return [snapshot(i) for i in items], items[-1].id if items else after_id


def _build_corpus(session: Session, user: UserRef, stamp: tuple[int, int], window_chars: int | None) -> UserCorpus:
    """The index over the user's most recent `window_chars` characters of the history under `stamp`, read newest
    first in batches that grow from _FIRST_BATCH, until the window is full: at most about twice the kept items
    are read and opened (reading oldest first opened the whole history: 100k items, 13.5 s). The longest run of
    newest items that fits, at least the newest one: the corpus an oldest-first pass kept. Its stamp: `stamp`'s
    count (an item committed late under its max id may be in the docs and not counted: the next stamp differs,
    and the index is built again) and the max id read."""
    newest: list[DocSnapshot] = []
    chars, up_to, batch, max_id, full = 0, stamp[1], _FIRST_BATCH, 0, stamp[1] == 0
    while not full and (rows := repo.newest_items(session, user, up_to_id=up_to, limit=batch)):
        max_id = max_id or rows[0].id
        for item in rows:
            doc = snapshot(item)
            chars += doc_chars(doc)
            if newest and window_chars is not None and chars > window_chars:
                full = True
                break
            newest.append(doc)
        full = full or len(rows) < batch
        up_to, batch = rows[-1].id - 1, min(2 * batch, _BUILD_PAGE)
    docs = newest[::-1]
    return UserCorpus(docs, BM25Index(docs, max_chars=window_chars), (stamp[0], max_id) if docs else (0, 0))


def retrieve(session: Session, user: UserRef, query: str, k: int, cache: BM25Cache[UserCorpus]) -> list[RetrievedDoc]:
    if k <= 0:
        return []
    corpus = user_corpus(session, user, cache)
    return [RetrievedDoc(corpus.docs[h.index], h.score) for h in corpus.index.top_k(query, k)]


def get_profile(session: Session, user: UserRef) -> ProfileOut:
    profile = repo.get_profile(session, user)
    if profile is None:
        raise NotFound("no profile for this user")
    return ProfileOut(text=profile.text, source=profile.source, updated_at=as_utc(profile.updated_at))


def profile_text(session: Session, user: UserRef) -> str | None:
    profile = repo.get_profile(session, user)
    return profile.text if profile is not None and profile.text.strip() else None


def set_profile(session: Session, user: UserRef, text: str, source: str = "user") -> ProfileOut:
    profile = repo.upsert_profile(session, user, text, source)
    return ProfileOut(text=profile.text, source=profile.source, updated_at=as_utc(profile.updated_at))
