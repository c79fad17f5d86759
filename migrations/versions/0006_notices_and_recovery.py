"""the notices outbox (key revoked, user erased, adapter changed: written in the causing transaction, polled by
every replica besides Redis pub/sub); users.recovery_hash (an owner's own key rotation needs the recovery code)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("owner_key", sa.String(40), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notices")),
        sqlite_autoincrement=True,  # a pruned id is never handed out again: replicas track ids
    )
    op.create_index(op.f("ix_notices_created_at"), "notices", ["created_at"])
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("recovery_hash", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("recovery_hash")
    op.drop_index(op.f("ix_notices_created_at"), table_name="notices")
    op.drop_table("notices")
