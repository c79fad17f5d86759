"""User accounts: create (with a first API key), rotate/revoke keys, erase. Services never commit."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ApiKey, User
from service.errors import Conflict
from service.tenancy import UserRef, check_user_id, hash_key, new_api_key


def create_user(session: Session, user_id: str) -> tuple[UserRef, str]:
    check_user_id(user_id)
    if session.execute(select(User.id).where(User.user_id == user_id)).first() is not None:
        raise Conflict(f"user {user_id!r} already exists")
    user = User(user_id=user_id)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent create won the race
        raise Conflict(f"user {user_id!r} already exists") from exc
    key = new_api_key()
    session.add(ApiKey(user_pk=user.id, key_hash=hash_key(key), prefix=key[:12]))
    session.flush()
    return UserRef(pk=user.id, user_id=user.user_id, storage_key=user.storage_key), key


def delete_user_rows(session: Session, user: UserRef) -> None:
    """Erase the user's rows; child tables go by ON DELETE CASCADE (enforced on SQLite too)."""
    session.execute(delete(User).where(User.id == user.pk))


def rotate_key(session: Session, user: UserRef) -> str:
    """A new key for the user; every older key stops working at the commit."""
    revoke_keys(session, user)
    key = new_api_key()
    session.add(ApiKey(user_pk=user.pk, key_hash=hash_key(key), prefix=key[:12]))
    session.flush()
    return key


def revoke_keys(session: Session, user: UserRef) -> int:
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.user_pk == user.pk, ApiKey.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
