"""API keys -> caller. The only place keys (and recovery codes) are generated, hashed and checked."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.accounts import repository as repo
from service.errors import Forbidden, NotFound, Unauthorized, Unprocessable

# THE user id rule (the public id; everything outside SQL uses the user's storage key instead).
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
USER_ID_MAX = 64
USER_ID_RE = re.compile(USER_ID_PATTERN)
KEY_PREFIX = "oppu_"
RECOVERY_PREFIX = "oppurc_"  # not a key: authenticate() finds no user for it


@dataclass(frozen=True)
class Caller:
    is_admin: bool
    user_pk: int | None = None  # set for user keys
    user_id: str | None = None
    key_hash: str | None = None  # the user key's sha256 (streams end when it is revoked)


@dataclass(frozen=True)
class UserRef:
    """A resolved, authorised user: what services receive first."""

    pk: int
    user_id: str
    storage_key: str


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_recovery_code() -> str:
    """The second secret of an owner's key rotation (see users.py); never a bearer key."""
    return RECOVERY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def recovery_code_matches(stored_hash: str | None, code: str | None) -> bool:
    """The code hashes to the stored hash (constant time); no stored hash or no code: False."""
    if stored_hash is None or code is None:
        return False
    return hmac.compare_digest(stored_hash.encode(), hash_key(code).encode())


def check_user_id(user_id: str) -> str:
    if not USER_ID_RE.fullmatch(user_id):
        raise Unprocessable(f"user_id must match {USER_ID_PATTERN}")
    return user_id


def parse_bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized("missing Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        raise Unauthorized("malformed Authorization header", headers={"WWW-Authenticate": "Bearer"})
    return token


def authenticate(session: Session, token: str, admin_key: str) -> Caller:
    if hmac.compare_digest(token.encode(), admin_key.encode()):
        return Caller(is_admin=True)
    # Lookup by hash of a high-entropy key; the stored value is a hash, compared in constant time.
    digest = hash_key(token)
    row = repo.user_by_key_hash(session, digest)
    if row is None or not hmac.compare_digest(row[0], digest):
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return Caller(is_admin=False, user_pk=row[1], user_id=row[2], key_hash=digest)


def authorize_user(session: Session, caller: Caller, user_id: str) -> UserRef:
    """The caller may act on user_id: admin, or the user themself. 404 only after authorisation."""
    check_user_id(user_id)
    if not caller.is_admin and caller.user_id != user_id:
        raise Forbidden("this key may only access its own user")
    user = repo.by_user_id(session, user_id)
    if user is None:
        raise NotFound(f"user {user_id!r} not found")
    return UserRef(pk=user.id, user_id=user.user_id, storage_key=user.storage_key)


def require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise Forbidden("admin key required")
