"""ALL SQL of the keyring (wrapped data keys and shredded owners). Every function is scoped by owner, except
the operator's counts and the master-key rotation's batches; nothing commits."""

from __future__ import annotations

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db.insert import insert_or_nothing
from service.sealing.models import DataKey, ShreddedOwner


def keys_of(session: Session, owner_key: str) -> list[DataKey]:
    return list(session.scalars(select(DataKey).where(DataKey.owner_key == owner_key).order_by(DataKey.version)))


def insert_key(session: Session, owner_key: str, version: int, kek_id: str, wrapped: bytes) -> bool:
    """False if this (owner, version) exists already (a concurrent writer won: read theirs)."""
    stmt = insert_or_nothing(session, DataKey, ["owner_key", "version"]).returning(DataKey.version)
    row = {"owner_key": owner_key, "version": version, "kek_id": kek_id, "wrapped": wrapped}
    return session.execute(stmt, row).scalar_one_or_none() is not None


def is_shredded(session: Session, owner_key: str) -> bool:
    return session.get(ShreddedOwner, owner_key) is not None


def shred(session: Session, owner_key: str) -> int:
    """Delete every key of the owner and leave a tombstone; returns how many keys went."""
    gone = getattr(session.execute(delete(DataKey).where(DataKey.owner_key == owner_key)), "rowcount", 0) or 0
    if session.get(ShreddedOwner, owner_key) is None:
        session.add(ShreddedOwner(owner_key=owner_key))
    session.flush()
    return int(gone)


def delete_versions_below(session: Session, owner_key: str, version: int) -> None:
    session.execute(delete(DataKey).where(DataKey.owner_key == owner_key, DataKey.version < version))


def kek_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(DataKey.kek_id, func.count()).group_by(DataKey.kek_id)).all()
    return {str(kek): int(n) for kek, n in rows}


def owner_count(session: Session) -> int:
    return int(session.scalar(select(func.count(func.distinct(DataKey.owner_key)))) or 0)


def shredded_count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ShreddedOwner)) or 0)


def one_per_kek(session: Session) -> list[DataKey]:
    """One wrapped key per KEK id in use (the start-up check opens each)."""
    firsts = select(DataKey.kek_id, func.min(DataKey.owner_key).label("owner")).group_by(DataKey.kek_id).subquery()
    return list(
        session.scalars(
            select(DataKey).join(firsts, (DataKey.kek_id == firsts.c.kek_id) & (DataKey.owner_key == firsts.c.owner))
        )
    )


def not_under(session: Session, kek_id: str, limit: int) -> list[DataKey]:
    """A batch of keys wrapped under another KEK than `kek_id` (master-key rotation)."""
    return list(session.scalars(select(DataKey).where(DataKey.kek_id != kek_id).limit(limit)))


def rewrap(session: Session, row: DataKey, old_kek: str, new_kek: str, wrapped: bytes) -> bool:
    """Compare-and-set: False if the row changed meanwhile (shredded, or re-wrapped by another run)."""
    result = session.execute(
        update(DataKey)
        .where(DataKey.owner_key == row.owner_key, DataKey.version == row.version, DataKey.kek_id == old_kek)
        .values(kek_id=new_kek, wrapped=wrapped)
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1
