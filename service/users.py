"""User accounts: create (with a first API key) and erase. Services never commit."""

from __future__ import annotations

from sqlalchemy import delete, select
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
