"""ALL SQL for adapter versions and heads. Owner first; nothing commits."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from service.db.insert import insert_or_nothing
from service.db.models import SHARED_OWNER, Adapter, AdapterContributor, AdapterHead


def head(session: Session, owner_key: str, *, for_update: bool = False) -> AdapterHead | None:
    stmt = select(AdapterHead).where(AdapterHead.owner_key == owner_key)
    if for_update:
        # populate_existing: a row already in the session is re-read, not served from the identity map (a
        # compare-and-set retry must see the counter another publish committed, or it spins forever)
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.execute(stmt).scalar_one_or_none()


def ensure_head(session: Session, owner_key: str, user_pk: int | None) -> AdapterHead:
    """The owner's head row, locked; made if missing. IntegrityError: the owner's user is gone (rows erased)."""
    row = head(session, owner_key, for_update=True)
    while row is None:
        # An owner's first two publishes at once both insert: the second skips (no SAVEPOINT: on SQLite it
        # could commit the empty head outside the caller's unit of work). Still none after a skip: the winner's
        # user was erased meanwhile, and inserting again fails on the foreign key.
        stmt = insert_or_nothing(session, AdapterHead, ["owner_key"])
        session.execute(stmt, {"owner_key": owner_key, "user_pk": user_pk, "current_version": None, "last_version": 0})
        row = head(session, owner_key, for_update=True)
    return row


def allocate_version(session: Session, owner_key: str, user_pk: int | None) -> int:
    """Next never-used version number (compare-and-set on last_version, safe across processes)."""
    while True:
        row = ensure_head(session, owner_key, user_pk)
        seen = row.last_version
        result = session.execute(
            update(AdapterHead)
            .where(AdapterHead.owner_key == owner_key, AdapterHead.last_version == seen)
            .values(last_version=seen + 1)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 1) == 1:
            session.refresh(row)
            return seen + 1


def set_current(session: Session, owner_key: str, version: int | None) -> None:
    session.execute(
        update(AdapterHead)
        .where(AdapterHead.owner_key == owner_key)
        .values(current_version=version)
        .execution_options(synchronize_session=False)
    )


def current(session: Session, owner_key: str) -> Adapter | None:
    row = head(session, owner_key)
    if row is None or row.current_version is None:
        return None
    return get_version(session, owner_key, row.current_version)


def get_version(session: Session, owner_key: str, version: int) -> Adapter | None:
    return session.execute(
        select(Adapter).where(Adapter.owner_key == owner_key, Adapter.version == version)
    ).scalar_one_or_none()


def list_versions(session: Session, owner_key: str) -> list[Adapter]:
    return list(session.scalars(select(Adapter).where(Adapter.owner_key == owner_key).order_by(Adapter.version.desc())))


def add(session: Session, adapter: Adapter) -> Adapter:
    session.add(adapter)
    session.flush()
    return adapter


def delete_versions(session: Session, owner_key: str, versions: list[int]) -> None:
    if versions:
        session.execute(delete(Adapter).where(Adapter.owner_key == owner_key, Adapter.version.in_(versions)))


def delete_all(session: Session, owner_key: str) -> list[int]:
    """Every version row of the owner deleted (the head, with its never-reused counter, stays); returns the
    versions this statement deleted: their files, and no others, are the caller's to remove.

    The head is locked first, as every publish locks it before it adds its version: a publish in flight commits
    before the delete reads the versions (and its version goes too), or starts after the delete's commit. The
    delete used to lock the head only when it cleared `current`: a version committed between its DELETE and that
    update was kept without being current (the upload answered 201 current, then GET /adapter 404)."""
    head(session, owner_key, for_update=True)
    deleted = session.scalars(delete(Adapter).where(Adapter.owner_key == owner_key).returning(Adapter.version))
    versions = sorted(deleted.all())
    set_current(session, owner_key, None)
    return versions


def all_versions(session: Session) -> list[tuple[str, int, int | None]]:
    """(owner key, version, current version) of every stored version (maintenance: all owners)."""
    rows = session.execute(
        select(Adapter.owner_key, Adapter.version, AdapterHead.current_version).join(
            AdapterHead, AdapterHead.owner_key == Adapter.owner_key, isouter=True
        )
    )
    return [(owner, version, current) for owner, version, current in rows]


def add_contributors(session: Session, adapter_id: int, storage_keys: Iterable[str]) -> None:
    """The users (by storage key, never reused) whose history trained a (shared) adapter version."""
    session.add_all(AdapterContributor(adapter_id=adapter_id, storage_key=key) for key in set(storage_keys))
    session.flush()


def flag_trained_on(session: Session, owner_key: str) -> int:
    """When a user (this storage key) is erased: every adapter version trained on their history is flagged
    (retrain to drop their influence), and the contributor rows naming them go. Returns how many versions."""
    trained = select(AdapterContributor.adapter_id).where(AdapterContributor.storage_key == owner_key)
    result = session.execute(
        update(Adapter)
        .where(Adapter.id.in_(trained))
        .values(trained_on_erased=True)
        .execution_options(synchronize_session=False)
    )
    session.execute(delete(AdapterContributor).where(AdapterContributor.storage_key == owner_key))
    return int(getattr(result, "rowcount", 0) or 0)


def flag_version_trained_on_erased(session: Session, owner_key: str, version: int) -> None:
    """A version published after one of its contributors was erased (the job trained meanwhile)."""
    session.execute(
        update(Adapter)
        .where(Adapter.owner_key == owner_key, Adapter.version == version)
        .values(trained_on_erased=True)
        .execution_options(synchronize_session=False)
    )


def current_version(session: Session, owner_key: str, *, for_update: bool = False) -> int | None:
    """The owner's current version read from the row (never a stale ORM copy); locked if asked."""
    stmt = select(AdapterHead.current_version).where(AdapterHead.owner_key == owner_key)
    if for_update:
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def is_trained_on_erased(session: Session, owner_key: str, version: int) -> bool:
    stmt = select(Adapter.trained_on_erased).where(Adapter.owner_key == owner_key, Adapter.version == version)
    return bool(session.execute(stmt).scalar_one_or_none())


def newest_clean_version(session: Session, owner_key: str) -> int | None:
    """The newest kept version not trained on an erased user's history (None: there is none)."""
    stmt = select(func.max(Adapter.version)).where(Adapter.owner_key == owner_key, Adapter.trained_on_erased.is_(False))
    return session.scalar(stmt)


def by_job(session: Session, job_id: str) -> Adapter | None:
    return session.execute(select(Adapter).where(Adapter.job_id == job_id)).scalar_one_or_none()


def _is_current() -> ColumnElement[bool]:
    return (AdapterHead.owner_key == Adapter.owner_key) & (AdapterHead.current_version == Adapter.version)


def _is_stale() -> ColumnElement[bool]:
    """THE stale rule: a user's trained adapter made on another shared task LoRA than the current one
    (no shared LoRA counts as a version of its own)."""
    shared = select(AdapterHead.current_version).where(AdapterHead.owner_key == SHARED_OWNER).scalar_subquery()
    return (
        (Adapter.user_pk.is_not(None)) & (Adapter.source == "trained") & Adapter.shared_version.is_distinct_from(shared)
    )


def _current_stale() -> Any:
    return select(Adapter).join(AdapterHead, _is_current()).where(_is_stale())


def stale_current(session: Session, after_user_pk: int, limit: int) -> list[Adapter]:
    """Users whose CURRENT adapter is stale (admin: all owners), a page of them by user pk past `after_user_pk`."""
    page = _current_stale().where(Adapter.user_pk > after_user_pk).order_by(Adapter.user_pk).limit(limit)
    return list(session.scalars(page))


def count_stale_current(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(_current_stale().subquery())) or 0)


def is_current_stale(session: Session, owner_key: str) -> bool:
    return session.scalar(_current_stale().where(Adapter.owner_key == owner_key).limit(1)) is not None


def unsealed_versions(session: Session, limit: int) -> list[Adapter]:
    """Versions whose files are still plaintext (sealing an existing deployment, all owners)."""
    return list(session.scalars(select(Adapter).where(Adapter.sealed.is_(False)).order_by(Adapter.id).limit(limit)))


def count_unsealed(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Adapter).where(Adapter.sealed.is_(False))) or 0)
