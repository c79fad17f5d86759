"""Alembic environment: the URL comes from service.db.migrate (never from the environment here)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from service.db import models  # noqa: F401  (registers tables on the metadata)
from service.db.base import Base
from service.db.session import make_engine

config = context.config
target_metadata = Base.metadata
# PostgreSQL: replicas starting together on a fresh database each ran the migrations and all but one failed on
# the tables another created. One migrates under this transaction lock; the others then find the head.
MIGRATION_LOCK_KEY = 0x4F505055  # "OPPU"


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.connect() as connection:
            _run(connection)
        engine.dispose()
    else:
        _run(connection)


def _run(connection: Connection) -> None:
    # SQLite: a batch migration rebuilds a table by copy, drop and rename; dropping a parent table with foreign
    # keys on would cascade-delete every child row. Off for the migration (outside any transaction, or SQLite
    # ignores it), checked and back on after.
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()  # end SQLAlchemy's autobegun transaction: Alembic then owns (and commits) its own
    try:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
            context.run_migrations()
            if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                raise RuntimeError("the migration left rows whose parent is missing (PRAGMA foreign_key_check)")
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
