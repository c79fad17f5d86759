"""User accounts: create (with a first API key), rotate/revoke keys, erase. Services never commit."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from service.accounts import repository as repo
from service.db.session import after_commit
from service.errors import Conflict
from service.tenancy import UserRef, check_user_id, hash_key, new_api_key


def create_user(session: Session, user_id: str) -> tuple[UserRef, str]:
    check_user_id(user_id)
    try:
        user = repo.insert_user(session, user_id)
    except repo.DuplicateUser as exc:
        raise Conflict(f"user {user_id!r} already exists") from exc
    key = new_api_key()
    repo.add_key(session, user.id, hash_key(key), key[:12])
    return UserRef(pk=user.id, user_id=user.user_id, storage_key=user.storage_key), key


def delete_user_rows(session: Session, user: UserRef) -> None:
    repo.delete_user(session, user.pk)


def rotate_key(session: Session, user: UserRef, on_revoked: Callable[[list[str]], None] | None = None) -> str:
    """A new key for the user; every older key stops working at the commit (and its streams end)."""
    revoke_keys(session, user, on_revoked)
    key = new_api_key()
    repo.add_key(session, user.pk, hash_key(key), key[:12])
    return key


def revoke_keys(session: Session, user: UserRef, on_revoked: Callable[[list[str]], None] | None = None) -> int:
    """Revoke the user's keys at the commit; after it, `on_revoked` (every replica's notice) ends their streams."""
    hashes = repo.revoke_keys(session, user.pk, datetime.now(UTC))
    if on_revoked is not None and hashes:
        after_commit(session, lambda: on_revoked(hashes))
    return len(hashes)
