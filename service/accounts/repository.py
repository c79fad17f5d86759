"""ALL SQL for users and their API keys. Every function is scoped by the user (pk or public id), except
the key lookup, which finds the user FROM a key hash; nothing commits."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ApiKey, User


class DuplicateUser(Exception):
    """A user with this public id exists already."""


def by_user_id(session: Session, user_id: str) -> User | None:
    return session.execute(select(User).where(User.user_id == user_id)).scalar_one_or_none()


def insert_user(session: Session, user_id: str) -> User:
    """DuplicateUser if the id is taken (also when a concurrent create wins the race: the insert fails, and the
    caller's unit of work must roll back, which the request's 409 does). No SAVEPOINT: on SQLite (pysqlite begins
    a transaction only before DML) it would be the transaction's first statement, and releasing it would commit
    the user at once, without the key added after it."""
    if by_user_id(session, user_id) is not None:
        raise DuplicateUser(user_id)
    user = User(user_id=user_id)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise DuplicateUser(user_id) from exc
    return user


def delete_user(session: Session, user_pk: int) -> None:
    """Child rows (history, profile, keys, adapters, jobs) go by ON DELETE CASCADE (enforced on SQLite too)."""
    session.execute(delete(User).where(User.id == user_pk))


def add_key(session: Session, user_pk: int, key_hash: str, prefix: str) -> None:
    session.add(ApiKey(user_pk=user_pk, key_hash=key_hash, prefix=prefix))
    session.flush()


def revoke_keys(session: Session, user_pk: int, now: datetime) -> list[str]:
    """Revoke every live key of the user; returns their hashes."""
    live = ApiKey.revoked_at.is_(None)
    hashes = list(session.scalars(select(ApiKey.key_hash).where(ApiKey.user_pk == user_pk, live)))
    session.execute(
        update(ApiKey)
        .where(ApiKey.user_pk == user_pk, live)
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    return hashes


def recovery_hash(session: Session, user_pk: int) -> str | None:
    """The hash of the user's recovery code (None: none issued)."""
    return session.execute(select(User.recovery_hash).where(User.id == user_pk)).scalar_one_or_none()


def set_recovery_hash(session: Session, user_pk: int, digest: str) -> None:
    session.execute(
        update(User).where(User.id == user_pk).values(recovery_hash=digest).execution_options(synchronize_session=False)
    )


def replace_recovery_hash(session: Session, user_pk: int, expected: str, digest: str) -> bool:
    """Compare-and-set: the user's recovery hash becomes `digest` only if it is still `expected` (one UPDATE, so
    on every database two rotations presenting the same code cannot both pass: SQLite ignores FOR UPDATE, and the
    second UPDATE runs after the first commits, PostgreSQL re-checks the row the first one changed). False:
    replaced meanwhile, nothing changed."""
    result = session.execute(
        update(User)
        .where(User.id == user_pk, User.recovery_hash == expected)
        .values(recovery_hash=digest)
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def lock_owner(session: Session, user_pk: int, owner_key: str) -> bool:
    """The user with this pk AND storage key still exists, and (PostgreSQL) cannot be deleted until this
    transaction ends (FOR SHARE): a job publishing for them either sees their erase or holds it back."""
    stmt = select(User.id).where(User.id == user_pk, User.storage_key == owner_key).with_for_update(read=True)
    return session.execute(stmt).first() is not None


def hold_for_sealed_write(session: Session, user_pk: int) -> None:
    """Row-lock the user (PostgreSQL; SQLite has one writer at a time anyway) until the transaction ends. Every
    write of the user's sealed data takes it before it seals or commits (history, profile, adapter files), and a
    data-key rotation's re-seal sweep takes it before it reads: a write that picked its data key before the
    rotation's settle time ended and commits late is either seen by the sweep or waits for it, so it never lands
    under a version the rotation is about to destroy. NO KEY UPDATE: the level of the quota UPDATE an append
    makes anyway (nothing to upgrade between two appends), and it still lets rows referencing the user in."""
    _hold_user_row(session, user_pk)


def hold_for_key_change(session: Session, user_pk: int) -> None:
    """Row-lock the user (as hold_for_sealed_write) until the transaction ends: the rotations and revocations
    of one user's keys run one after the other, each revoking the key the one before it made (read committed:
    a key inserted by a rotation committing during another's revoke was not seen)."""
    _hold_user_row(session, user_pk)


def _hold_user_row(session: Session, user_pk: int) -> None:
    session.execute(select(User.id).where(User.id == user_pk).with_for_update(key_share=True))


def existing_storage_keys(session: Session, keys: Iterable[str]) -> set[str]:
    """Which of these storage keys still belong to a user, locked FOR SHARE (PostgreSQL) like lock_owner:
    a shared job publishing knows which of its contributors were erased while it trained."""
    wanted = sorted(set(keys))
    if not wanted:
        return set()
    stmt = select(User.storage_key).where(User.storage_key.in_(wanted)).with_for_update(read=True)
    return set(session.scalars(stmt))


def all_user_keys(session: Session) -> list[tuple[int, str]]:
    """(pk, storage key) of every user: the shared task LoRA trains on all of them (admin job)."""
    return [(pk, key) for pk, key in session.execute(select(User.id, User.storage_key).order_by(User.id))]


def user_by_key_hash(session: Session, key_hash: str) -> tuple[str, int, str] | None:
    """(stored hash, user pk, user id) of the unrevoked key with this hash."""
    row = session.execute(
        select(ApiKey.key_hash, User.id, User.user_id)
        .join(User, User.id == ApiKey.user_pk)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).first()
    return (row[0], row[1], row[2]) if row is not None else None


def user_id_by_storage_key(session: Session, owner_key: str) -> str | None:
    """The public id of the user owning this storage key (/metrics names resident adapters by it)."""
    return session.execute(select(User.user_id).where(User.storage_key == owner_key)).scalar_one_or_none()


def keys_of(session: Session, user_pk: int) -> list[ApiKey]:
    """Every key of a user, revoked ones too, oldest first (for the export: metadata, never the hash)."""
    return list(session.scalars(select(ApiKey).where(ApiKey.user_pk == user_pk).order_by(ApiKey.id)))
