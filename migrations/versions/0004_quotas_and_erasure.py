"""per-user history counters (quotas); shared adapters remember whose history trained them, and are flagged
when one of those users is erased

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("history_items", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("history_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    # Existing histories: count what is there.
    op.execute(
        "UPDATE users SET history_items = (SELECT COUNT(*) FROM history_items h WHERE h.user_pk = users.id), "
        "history_bytes = (SELECT COALESCE(SUM(LENGTH(COALESCE(h.input, '')) + LENGTH(h.output)), 0) "
        "FROM history_items h WHERE h.user_pk = users.id)"
    )
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("trained_on_erased", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "adapter_contributors",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("adapter_id", "user_pk", name=op.f("pk_adapter_contributors")),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], ondelete="CASCADE", name=op.f("fk_adapter_contributors_adapter_id_adapters")
        ),
        sa.ForeignKeyConstraint(
            ["user_pk"], ["users.id"], ondelete="CASCADE", name=op.f("fk_adapter_contributors_user_pk_users")
        ),
    )
    op.create_index(op.f("ix_adapter_contributors_user_pk"), "adapter_contributors", ["user_pk"])


def downgrade() -> None:
    op.drop_index(op.f("ix_adapter_contributors_user_pk"), table_name="adapter_contributors")
    op.drop_table("adapter_contributors")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("trained_on_erased")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("history_bytes")
        batch.drop_column("history_items")
