"""ALL SQL for history items and profiles. Every function takes the user first; nothing commits.

Sealing happens here, at the boundary of SQL (service.sealing): a row is written sealed under its owner's data
key (the client id kept only as a keyed hash, for idempotency; id, input, output, kind and metadata in one
token bound to the owner) and read back as a plain record, never as an ORM object holding plaintext (an
autoflush could write it back). Rows written before sealing (`sealed` NULL) read as they are."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.accounts.repository import hold_for_sealed_write
from service.db.insert import insert_or_nothing
from service.db.models import HistoryItem, Profile, User
from service.sealing.cipher import token_version
from service.sealing.service import SealedDataUnreadable, UserDataErased, UserSeal, tag_version
from service.sealing.session import seal_of

_ITEMS, _PROFILE = "history_items", "profiles"  # purposes the sealed values are bound to


class Owner(Protocol):
    """Whose rows: the user's pk (SQL) and storage key (their data key)."""

    @property
    def pk(self) -> int: ...

    @property
    def storage_key(self) -> str: ...


@dataclass(frozen=True)
class OwnerRef:
    pk: int
    storage_key: str


@dataclass(frozen=True)
class HistoryRecord:
    """A history item as read: plaintext, detached from any session."""

    id: int
    client_id: str
    input: str | None
    output: str
    kind: str | None
    meta: dict[str, Any] | None
    timestamp: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class ProfileRecord:
    text: str
    source: str
    updated_at: datetime


def _record(seal: UserSeal, item: HistoryItem) -> HistoryRecord:
    if item.sealed is None:
        return HistoryRecord(
            item.id, item.client_id, item.input, item.output, item.kind, item.meta, item.timestamp, item.created_at
        )
    try:
        v = json.loads(seal.open_text(_ITEMS, item.sealed))
        fields = v["id"], v["input"], v["output"], v["kind"], v["meta"]
        return HistoryRecord(item.id, *fields, item.timestamp, item.created_at)
    except (ValueError, KeyError, TypeError) as exc:
        raise SealedDataUnreadable("a stored history item of this user is damaged") from exc


_SEALED_COLUMNS = ("client_id", "input", "output", "kind", "meta", "sealed")


def _sealed_row(seal: UserSeal, row: dict[str, Any], tag: str) -> dict[str, Any]:
    """The row as stored: every user-written field in one token; the client id only as its keyed hash `tag`."""
    payload = {k: row[k] for k in ("input", "output", "kind", "meta")} | {"id": row["client_id"]}
    token = seal.seal_text(_ITEMS, json.dumps(payload, ensure_ascii=False, separators=(",", ":")))
    return {**row, "client_id": tag, "input": None, "output": "", "kind": None, "meta": None, "sealed": token}


def _sealed_under_one_version(seal: UserSeal, row: dict[str, Any]) -> dict[str, Any]:
    """The row as stored (_sealed_row), its token and its client id's keyed hash under ONE data-key version: each
    asks the sealer for the current version, and a rotation seen between the two (a replica's cached keys
    re-read) is redone, at most twice more; a row still split is remade by the rotation's sweep (`reseal`)."""
    for _ in range(3):
        tag = seal.tag(row["client_id"])
        sealed = _sealed_row(seal, row, tag)
        if token_version(sealed["sealed"]) == tag_version(tag):
            break
    return sealed


def _seal_in_place(seal: UserSeal, item: HistoryItem) -> None:
    """Seal a stored row under the owner's current key, whatever it holds now (plaintext, or an older key)."""
    r = _record(seal, item)
    row = {"client_id": r.client_id, "input": r.input, "output": r.output, "kind": r.kind, "meta": r.meta}
    sealed = _sealed_under_one_version(seal, row)
    for column in _SEALED_COLUMNS:
        setattr(item, column, sealed[column])


def _seal_profile_in_place(seal: UserSeal, profile: Profile) -> None:
    text = profile.text if profile.sealed is None else seal.open_text(_PROFILE, profile.sealed)
    profile.sealed, profile.text = seal.seal_text(_PROFILE, text), ""


def _lookup(seal: UserSeal, client_ids: Sequence[str]) -> dict[str, str]:
    """What a row of each client id may hold in its client_id column -> that client id: the id itself (rows
    written before sealing) and, sealing, its keyed hash under every live data-key version of the owner (during
    a key rotation a row not yet re-sealed holds its hash under the old version)."""
    stored = {c: c for c in client_ids}
    if seal.enabled:
        for c, tags in seal.tags(client_ids).items():
            stored.update((t, c) for t in tags)
    return stored


def existing_client_ids(session: Session, owner: Owner, client_ids: Sequence[str]) -> set[str]:
    return _existing(session, owner.pk, _lookup(seal_of(session, owner.storage_key), client_ids))


def _existing(session: Session, user_pk: int, stored: dict[str, str]) -> set[str]:
    """The client ids (values of `stored`, see `_lookup`) the user has a row for."""
    keys = list(stored)
    found: set[str] = set()
    for start in range(0, len(keys), 500):  # bounded IN lists
        chunk = keys[start : start + 500]
        hits = session.scalars(
            select(HistoryItem.client_id).where(HistoryItem.user_pk == user_pk, HistoryItem.client_id.in_(chunk))
        )
        found.update(stored[h] for h in hits)
    return found


def insert_items_ignore_duplicates(session: Session, owner: Owner, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert rows; a (user, client_id) that already exists is skipped by the database itself, so
    concurrent appends of the same ids cannot both succeed. Returns the client ids really inserted."""
    if not rows:
        return set()
    hold_for_sealed_write(session, owner.pk)
    seal = seal_of(session, owner.storage_key)
    user_pk = owner.pk
    if seal.enabled:
        # Rows of the plaintext era or hashed under an older key version: the unique index cannot see them. The
        # lookup comes first: it re-reads the owner's key versions from the keyring, so a replica whose cached
        # keys predate a rotation hashes and seals under the new version (hashing first, from its cache, then
        # sealing after the refresh split a row between two versions: after the old one was destroyed, a retry
        # with the same client id was stored twice).
        known = _existing(session, user_pk, _lookup(seal, [r["client_id"] for r in rows]))
        first_of: dict[str, dict[str, Any]] = {}
        for r in rows:  # an id twice in one call: the first row (sealed once, so hashed once)
            if r["client_id"] not in known:
                first_of.setdefault(r["client_id"], r)
        stored = {c: _sealed_under_one_version(seal, r) for c, r in first_of.items()}
        client_id_of = {v["client_id"]: c for c, v in stored.items()}
        values = [{**v, "user_pk": user_pk} for v in stored.values()]
    else:
        client_id_of = {r["client_id"]: r["client_id"] for r in rows}
        values = [{**row, "user_pk": user_pk} for row in rows]
    if not values:
        return set()
    stmt = insert_or_nothing(session, HistoryItem, ["user_pk", "client_id"])
    # Executemany form: SQLAlchemy batches it as multi-row INSERTs ("insertmanyvalues") with a cached
    # compiled statement (4-15x faster than .values(list), which compiles 8 binds per row every call).
    # RETURNING tells what was really inserted (rowcount is -1 on some drivers for multi-row inserts).
    with _owner_erased_is_410():
        return {client_id_of[c] for c in session.scalars(stmt.returning(HistoryItem.client_id), values).all()}


def charge_quota(session: Session, user_pk: int, items: int, nbytes: int, max_items: int, max_bytes: int) -> bool:
    """Add to the user's history counters if both stay within the quota (one atomic UPDATE: concurrent
    appends cannot pass it together). False: over the quota, nothing changed."""
    result = session.execute(
        update(User)
        .where(
            User.id == user_pk,
            User.history_items + items <= max_items,
            User.history_bytes + nbytes <= max_bytes,
        )
        .values(history_items=User.history_items + items, history_bytes=User.history_bytes + nbytes)
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def quota_use(session: Session, user_pk: int) -> tuple[int, int]:
    row = session.execute(select(User.history_items, User.history_bytes).where(User.id == user_pk)).one()
    return int(row[0]), int(row[1])


def list_items(session: Session, owner: Owner, *, after_id: int, limit: int) -> list[HistoryRecord]:
    seal = seal_of(session, owner.storage_key)
    rows = session.scalars(
        select(HistoryItem)
        .where(HistoryItem.user_pk == owner.pk, HistoryItem.id > after_id)
        .order_by(HistoryItem.id)
        .limit(limit)
    )
    return [_record(seal, r) for r in rows]


def newest_items(session: Session, owner: Owner, *, up_to_id: int, limit: int) -> list[HistoryRecord]:
    """Up to `limit` of the user's items with id <= up_to_id, newest first (only those are read and opened)."""
    seal = seal_of(session, owner.storage_key)
    rows = session.scalars(
        select(HistoryItem)
        .where(HistoryItem.user_pk == owner.pk, HistoryItem.id <= up_to_id)
        .order_by(HistoryItem.id.desc())
        .limit(limit)
    )
    return [_record(seal, r) for r in rows]


def iter_items(session: Session, owner: Owner, *, page: int = 500) -> Iterator[HistoryRecord]:
    """The user's items in append order, read and opened a page at a time (an export of 100k items with
    metadata held ~3.8 GB when read whole)."""
    after = 0
    while rows := list_items(session, owner, after_id=after, limit=page):
        yield from rows
        after = rows[-1].id


def latest_items(session: Session, owner: Owner, n: int) -> list[HistoryRecord]:
    """The user's `n` most recent items, in append order (only those are read and opened)."""
    seal = seal_of(session, owner.storage_key)
    stmt = select(HistoryItem).where(HistoryItem.user_pk == owner.pk).order_by(HistoryItem.id.desc()).limit(n)
    return [_record(seal, r) for r in reversed(list(session.scalars(stmt)))]


def all_items(session: Session, owner: Owner, *, up_to_id: int | None = None) -> list[HistoryRecord]:
    """The user's items in append order (the order retrieval and training see)."""
    seal = seal_of(session, owner.storage_key)
    stmt = select(HistoryItem).where(HistoryItem.user_pk == owner.pk)
    if up_to_id is not None:
        stmt = stmt.where(HistoryItem.id <= up_to_id)
    return [_record(seal, r) for r in session.scalars(stmt.order_by(HistoryItem.id))]


def count_items(session: Session, user_pk: int) -> int:
    return int(session.scalar(select(func.count()).where(HistoryItem.user_pk == user_pk)) or 0)


def max_item_id(session: Session, user_pk: int) -> int | None:
    return session.scalar(select(func.max(HistoryItem.id)).where(HistoryItem.user_pk == user_pk))


def delete_items(session: Session, user_pk: int) -> None:
    session.execute(delete(HistoryItem).where(HistoryItem.user_pk == user_pk))


def get_profile(session: Session, owner: Owner) -> ProfileRecord | None:
    profile = session.get(Profile, owner.pk)
    if profile is None:
        return None
    text = profile.text
    if profile.sealed is not None:
        text = seal_of(session, owner.storage_key).open_text(_PROFILE, profile.sealed)
    return ProfileRecord(text, profile.source, profile.updated_at)


def upsert_profile(session: Session, owner: Owner, text: str, source: str) -> ProfileRecord:
    hold_for_sealed_write(session, owner.pk)
    seal = seal_of(session, owner.storage_key)
    stored, sealed = ("", seal.seal_text(_PROFILE, text)) if seal.enabled else (text, None)
    profile = session.get(Profile, owner.pk)
    now = datetime.now(UTC)
    if profile is None:
        profile = Profile(user_pk=owner.pk, text=stored, source=source, updated_at=now, sealed=sealed)
        session.add(profile)
    else:
        profile.text, profile.source, profile.updated_at, profile.sealed = stored, source, now, sealed
    with _owner_erased_is_410():
        session.flush()
    return ProfileRecord(text, source, profile.updated_at)


@contextmanager
def _owner_erased_is_410() -> Iterator[None]:
    """A row inserted for a user whose erase committed after the request resolved them (sealing off: nothing
    looked their data key up) breaks its foreign key: the erased user's 410, not a 500. Other integrity errors
    stay what they are."""
    try:
        yield
    except IntegrityError as exc:
        orig = exc.orig
        if getattr(orig, "sqlstate", None) == "23503" or getattr(orig, "sqlite_errorname", None) == _SQLITE_FK:
            raise UserDataErased("this user was erased; nothing was stored") from exc
        raise


_SQLITE_FK = "SQLITE_CONSTRAINT_FOREIGNKEY"  # PostgreSQL: SQLSTATE 23503 foreign_key_violation


def history_stamp(session: Session, user_pk: int) -> tuple[int, int]:
    """(count, max id) of the user's items: changes with every write, in any replica."""
    count, max_id = session.execute(
        select(func.count(HistoryItem.id), func.max(HistoryItem.id)).where(HistoryItem.user_pk == user_pk)
    ).one()
    return int(count or 0), int(max_id or 0)


def count_items_after(session: Session, user_pk: int, after_id: int, up_to_id: int | None = None) -> int:
    """Items with after_id < id (<= up_to_id): bounded by a stamp's max id, an append committed since the stamp
    was read is not counted."""
    where = [HistoryItem.user_pk == user_pk, HistoryItem.id > after_id]
    if up_to_id is not None:
        where.append(HistoryItem.id <= up_to_id)
    return int(session.scalar(select(func.count()).where(*where)) or 0)


# --- sealing an existing plaintext deployment (operator, all users) ---


def count_plaintext(session: Session) -> tuple[int, int]:
    """(history items, profiles) still stored as plaintext."""
    items = session.scalar(select(func.count()).select_from(HistoryItem).where(HistoryItem.sealed.is_(None))) or 0
    profiles = session.scalar(select(func.count()).select_from(Profile).where(Profile.sealed.is_(None))) or 0
    return int(items), int(profiles)


def seal_plaintext(session: Session, limit: int) -> int:
    """Seal up to `limit` plaintext history items and profiles under their owners' keys (resumable: a row is
    sealed in place, once). Returns how many rows were sealed."""
    done = 0
    rows = session.execute(
        select(HistoryItem, User.storage_key)
        .join(User, User.id == HistoryItem.user_pk)
        .where(HistoryItem.sealed.is_(None))
        .order_by(HistoryItem.id)
        .limit(limit)
    ).all()
    for item, storage_key in rows:
        _seal_in_place(seal_of(session, storage_key), item)
        done += 1
    profiles = session.execute(
        select(Profile, User.storage_key)
        .join(User, User.id == Profile.user_pk)
        .where(Profile.sealed.is_(None))
        .limit(max(0, limit - done))
    ).all()
    for profile, storage_key in profiles:
        _seal_profile_in_place(seal_of(session, storage_key), profile)
        done += 1
    session.flush()
    return done


def reseal(session: Session, owner: Owner) -> int:
    """Re-seal the owner's rows under their current data key (a per-user key rotation); plaintext rows are
    sealed too. Returns how many rows changed."""
    hold_for_sealed_write(session, owner.pk)  # a write still in flight commits first, and is seen here
    seal = seal_of(session, owner.storage_key)
    current = seal.version()
    done = 0
    for item in session.scalars(select(HistoryItem).where(HistoryItem.user_pk == owner.pk)):
        # Current means the token AND the client id's hash: a row hashed under an old version would match no
        # retried append once that version is destroyed.
        if item.sealed is not None and token_version(item.sealed) == current == tag_version(item.client_id):
            continue
        _seal_in_place(seal, item)
        done += 1
    profile = session.get(Profile, owner.pk)
    if profile is not None and (profile.sealed is None or token_version(profile.sealed) != current):
        _seal_profile_in_place(seal, profile)
        done += 1
    session.flush()
    return done
