"""ALL SQL for the notices outbox. A notice is added in the transaction that causes it (scoped by the owner it
concerns); replicas read every notice after the last one they applied (all owners: each replica serves all of
them). Nothing commits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.db.models import Notice


def add(session: Session, owner_key: str, kind: str, payload: str) -> None:
    session.add(Notice(kind=kind, owner_key=owner_key, payload=payload))
    session.flush()  # the id is taken now: its place in the order is the insert's, not the commit's


def after(session: Session, seq: int) -> list[tuple[int, str, str]]:
    """(id, kind, payload) of every notice with an id above `seq`, in id order."""
    rows = session.execute(select(Notice.id, Notice.kind, Notice.payload).where(Notice.id > seq).order_by(Notice.id))
    return [(i, kind, payload) for i, kind, payload in rows]


def last_id(session: Session) -> int:
    return int(session.scalar(select(func.max(Notice.id))) or 0)


def prune(session: Session, before: datetime) -> int:
    result = session.execute(delete(Notice).where(Notice.created_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
