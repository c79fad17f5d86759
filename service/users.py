"""User accounts: create (with a first API key), rotate/revoke keys, recovery codes, erase. Services never commit.

THE rotation rule: an owner rotating their own key presents the current key (the bearer) AND re-authenticates
with their recovery code, a second secret shown once (at creation and at every rotation), stored only as a
sha256 and never sent on ordinary requests, so a stolen key alone cannot rotate the owner out (403
`reauth_required`). The admin's rotation needs no code: it is the recovery path for an owner who lost theirs.
Every rotation revokes all the user's keys, issues one new key and a new recovery code (the old code stops
working). Revocations and erasures are written to the notices outbox in the same transaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from service.accounts import repository as repo
from service.db.session import after_commit
from service.errors import Conflict, Forbidden
from service.notices import outbox
from service.tenancy import UserRef, check_user_id, hash_key, new_api_key, new_recovery_code, recovery_code_matches


class ReauthRequired(Forbidden):
    """An owner's own key rotation without their valid recovery code."""

    code = "reauth_required"


@dataclass(frozen=True)
class NewKey:
    api_key: str
    recovery_code: str


def create_user(session: Session, user_id: str) -> tuple[UserRef, str]:
    check_user_id(user_id)
    try:
        user = repo.insert_user(session, user_id)
    except repo.DuplicateUser as exc:
        raise Conflict(f"user {user_id!r} already exists") from exc
    key = new_api_key()
    repo.add_key(session, user.id, hash_key(key), key[:12])
    return UserRef(pk=user.id, user_id=user.user_id, storage_key=user.storage_key), key


def issue_recovery_code(session: Session, user: UserRef) -> str:
    """A new recovery code for the user (any earlier one stops working at the commit); shown once."""
    code = new_recovery_code()
    repo.set_recovery_hash(session, user.pk, hash_key(code))
    return code


def delete_user_rows(session: Session, user: UserRef) -> None:
    repo.delete_user(session, user.pk)
    # In the erase's transaction: replicas that miss the pub/sub notices (Redis down) still hear them.
    outbox.record_erased(session, user.storage_key)
    outbox.record_adapter(session, user.storage_key, None)


def rotate_key(
    session: Session,
    user: UserRef,
    on_revoked: Callable[[list[str]], None] | None = None,
    *,
    by_admin: bool = False,
    recovery_code: str | None = None,
) -> NewKey:
    """A new key and recovery code; every older key stops working at the commit (and its streams end). The
    owner (not `by_admin`) must give the current recovery code: ReauthRequired otherwise, nothing changes."""
    code = new_recovery_code()
    if by_admin:
        repo.set_recovery_hash(session, user.pk, hash_key(code))
    else:
        replace_recovery_code(session, user, recovery_code, hash_key(code))
    revoke_keys(session, user, on_revoked)
    key = new_api_key()
    repo.add_key(session, user.pk, hash_key(key), key[:12])
    return NewKey(key, code)


def replace_recovery_code(session: Session, user: UserRef, given: str | None, new_hash: str) -> None:
    """The owner's code checked (constant time) and replaced by `new_hash` in one compare-and-set on the stored
    hash: of concurrent rotations with the same code exactly one passes, the others are ReauthRequired (on
    SQLite too, where a row lock is no lock)."""
    stored = repo.recovery_hash(session, user.pk)
    if stored is None or not recovery_code_matches(stored, given):
        raise ReauthRequired(REAUTH_MESSAGE)
    if not repo.replace_recovery_hash(session, user.pk, stored, new_hash):
        raise ReauthRequired(f"{REAUTH_MESSAGE} (the code was used by another rotation meanwhile)")


REAUTH_MESSAGE = (
    "rotating your own key needs your recovery code (`recovery_code` in the body: from the user's creation "
    "or the last rotation); without it, the admin can rotate the key for you"
)


def revoke_keys(session: Session, user: UserRef, on_revoked: Callable[[list[str]], None] | None = None) -> int:
    """Revoke the user's keys at the commit; after it, `on_revoked` (every replica's notice) ends their streams."""
    repo.hold_for_key_change(session, user.pk)
    hashes = repo.revoke_keys(session, user.pk, datetime.now(UTC))
    outbox.record_revoked(session, user.storage_key, hashes)  # for replicas that miss the pub/sub notice
    if on_revoked is not None and hashes:
        after_commit(session, lambda: on_revoked(hashes))
    return len(hashes)
