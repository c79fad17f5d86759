"""Migrations are the schema: upgrade/downgrade round trips on SQLite and PostgreSQL, and the migrated
schema equals the ORM metadata (no autogenerate diff)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Double, Float, inspect, text

from service.db import models  # noqa: F401  (registers every table on the metadata)
from service.db.base import Base
from service.db.migrate import NotMigrated, alembic_config, check_migrated, downgrade, upgrade
from service.db.session import make_engine
from tests.conftest import _pg_fresh_schema_url


def _compare_type(ctx: Any, inspected: Any, metadata: Any, inspected_type: Any, metadata_type: Any) -> bool | None:
    """Alembic's type comparison, except Float vs Double on SQLite: both are REAL there and reflection
    cannot tell them apart (SQLAlchemy 2.1 maps `Mapped[float]` to Double; sa.Float() in a migration)."""
    if ctx.dialect.name == "sqlite" and isinstance(inspected_type, Float) and isinstance(metadata_type, Double):
        return False
    return None  # default comparison


def schema_diff(url: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": _compare_type})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def head(url: str) -> str:
    heads = ScriptDirectory.from_config(alembic_config(url)).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return heads[0]


def test_one_linear_history_with_downgrades(db_url: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(db_url))
    revisions = list(script.walk_revisions())
    assert revisions, "no migrations"
    assert sum(1 for r in revisions if r.down_revision is None) == 1
    for rev in revisions:
        source = Path(rev.path).read_text()
        assert "def downgrade()" in source and "pass\n" not in source.split("def downgrade()")[1][:40], rev.path


def test_head_matches_the_orm(db_url: str) -> None:
    assert current_revision(db_url) == head(db_url)
    assert schema_diff(db_url) == []
    assert set(Base.metadata.tables) <= table_names(db_url)


def test_downgrade_to_base_and_back(db_url: str) -> None:
    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    assert table_names(db_url) - {"alembic_version"} == set()
    upgrade(db_url)
    assert current_revision(db_url) == head(db_url)
    assert schema_diff(db_url) == []


def test_each_step_round_trips(db_url: str) -> None:
    """Every revision downgrades and re-upgrades cleanly one step at a time (catches a downgrade that
    leaves an index or constraint behind)."""
    script = ScriptDirectory.from_config(alembic_config(db_url))
    revisions = [r.revision for r in script.walk_revisions()]  # head first
    for rev in revisions:
        assert current_revision(db_url) == rev
        tables = table_names(db_url)
        downgrade(db_url, "-1")
        upgrade(db_url, "+1")
        assert current_revision(db_url) == rev
        assert table_names(db_url) == tables, rev
        downgrade(db_url, "-1")
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert schema_diff(db_url) == []


MIGRATE_WHEN_GO = """
import sys, time
from pathlib import Path
from service.db.migrate import upgrade
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
upgrade(sys.argv[1])
"""


def test_replicas_migrating_one_fresh_postgres_database_at_once_all_succeed(tmp_path: Path) -> None:
    # Every API container runs `oppu migrate` before serving: on a fresh database two of them at once failed on
    # `pg_type_typname_nsp_index` (both creating the same tables), and compose's first `up` stopped there.
    for round_ in range(2):
        for url in _pg_fresh_schema_url():
            go = tmp_path / f"go{round_}"
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", MIGRATE_WHEN_GO, url, str(go)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONPATH": str(Path.cwd())},
                )
                for _ in range(3)
            ]
            time.sleep(3)  # every process is past its imports, polling for the start
            go.touch()
            outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
            failed = [out[-800:] for p, out in zip(procs, outputs, strict=True) if p.returncode != 0]
            assert not failed, failed
            assert schema_diff(url) == []


def test_only_a_database_at_the_head_or_past_it_is_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    engine = make_engine(url)
    with pytest.raises(NotMigrated, match=r"no schema.*run `oppu migrate`"):
        check_migrated(engine)
    upgrade(url, "0007")
    with pytest.raises(NotMigrated, match=r"0007.*run `oppu migrate`"):
        check_migrated(engine)
    upgrade(url)
    check_migrated(engine)
    with engine.begin() as conn:  # a newer release migrated it (a rolling upgrade): used, with a warning
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    check_migrated(engine)
    engine.dispose()
