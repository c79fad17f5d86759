"""Runs Alembic migrations programmatically (the schema is the migrations, never create_all), and checks that a
database is at the code's head before anything uses it."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


class NotMigrated(RuntimeError):
    """The database's schema is not the code's: a command would fail on a missing table or column."""


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def check_migrated(engine: Engine) -> None:
    """NotMigrated if the database has no schema or one older than the code's (a command would fail at its
    first query with a traceback): says to run `oppu migrate`. A revision this code does not know (a newer
    release migrated it during a rolling upgrade) is only logged: the newer schema is a superset."""
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    heads = set(_scripts().get_heads())
    if current == heads:
        return
    known = {rev.revision for rev in _scripts().walk_revisions()}
    if current and not current <= known:
        log.warning("the database is at a migration this release does not know (%s): a newer release?", current)
        return
    found = ", ".join(sorted(current)) or "no schema"
    raise NotMigrated(
        f"the database is not at the latest migration ({found}; this release needs {', '.join(sorted(heads))}): "
        "run `oppu migrate`"
    )
