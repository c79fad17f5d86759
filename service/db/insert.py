"""The one way to insert a row unless a unique index already holds its key: `INSERT ... ON CONFLICT DO NOTHING`
in the session's dialect. Repositories use it instead of a SAVEPOINT around a plain insert: on SQLite (pysqlite
begins a transaction only before DML) a SAVEPOINT can be the transaction's first statement, and releasing it
then commits the row at once, outside the caller's unit of work. Knows no model."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session


def insert_or_nothing(
    session: Session, model: Any, index_elements: list[str], index_where: ColumnElement[bool] | None = None
) -> Any:
    """The INSERT statement for `model` that skips rows whose key (`index_elements`, of a partial index when
    `index_where` is given) is taken; execute it with the row(s). Other errors (a foreign key) still raise."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(model).on_conflict_do_nothing(index_elements=index_elements, index_where=index_where)
    if dialect == "sqlite":
        return sqlite_insert(model).on_conflict_do_nothing(index_elements=index_elements, index_where=index_where)
    raise NotImplementedError(f"no conflict-free insert for the {dialect} dialect (SQLite and PostgreSQL only)")
