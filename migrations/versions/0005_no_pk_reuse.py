"""never reuse a pk (SQLite AUTOINCREMENT on users, history_items, adapters); shared-adapter contributors by
storage key instead of user pk; jobs.requeued_at (the reaper re-enqueues a queued job at most once per period)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NO_REUSE = ("users", "history_items", "adapters")


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _autoincrement(on: bool) -> None:
    """SQLite only: the table is rebuilt with (or without) AUTOINCREMENT; the copied rows set its sequence to
    the largest pk there is. PostgreSQL's sequences never reuse a value: nothing to do there. env.py turns
    foreign keys off around SQLite migrations, so rebuilding a parent table never cascades."""
    if not _sqlite():
        return
    for table in NO_REUSE:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": on}):
            pass


def upgrade() -> None:
    _autoincrement(True)
    with op.batch_alter_table("adapter_contributors") as batch:
        batch.add_column(sa.Column("storage_key", sa.String(32), nullable=True))
    op.execute(
        "UPDATE adapter_contributors SET storage_key = "
        "(SELECT u.storage_key FROM users u WHERE u.id = adapter_contributors.user_pk)"
    )
    op.execute("DELETE FROM adapter_contributors WHERE storage_key IS NULL")
    op.drop_index(op.f("ix_adapter_contributors_user_pk"), table_name="adapter_contributors")
    with op.batch_alter_table("adapter_contributors", recreate="always") as batch:
        batch.drop_constraint(op.f("pk_adapter_contributors"), type_="primary")
        batch.drop_constraint(op.f("fk_adapter_contributors_user_pk_users"), type_="foreignkey")
        batch.drop_column("user_pk")
        batch.alter_column("storage_key", existing_type=sa.String(32), nullable=False)
        batch.create_primary_key(op.f("pk_adapter_contributors"), ["adapter_id", "storage_key"])
    op.create_index(op.f("ix_adapter_contributors_storage_key"), "adapter_contributors", ["storage_key"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("requeued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("requeued_at")
    op.drop_index(op.f("ix_adapter_contributors_storage_key"), table_name="adapter_contributors")
    with op.batch_alter_table("adapter_contributors") as batch:
        batch.add_column(sa.Column("user_pk", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE adapter_contributors SET user_pk = "
        "(SELECT u.id FROM users u WHERE u.storage_key = adapter_contributors.storage_key)"
    )
    op.execute("DELETE FROM adapter_contributors WHERE user_pk IS NULL")  # erased contributors had no pk left
    with op.batch_alter_table("adapter_contributors", recreate="always") as batch:
        batch.drop_constraint(op.f("pk_adapter_contributors"), type_="primary")
        batch.drop_column("storage_key")
        batch.alter_column("user_pk", existing_type=sa.Integer(), nullable=False)
        batch.create_primary_key(op.f("pk_adapter_contributors"), ["adapter_id", "user_pk"])
        batch.create_foreign_key(
            op.f("fk_adapter_contributors_user_pk_users"), "users", ["user_pk"], ["id"], ondelete="CASCADE"
        )
    op.create_index(op.f("ix_adapter_contributors_user_pk"), "adapter_contributors", ["user_pk"])
    _autoincrement(False)
