"""encryption at rest: history_items.sealed and profiles.sealed (the sealed values; NULL = plaintext, as every
row was before), adapters.sealed (whether the version's files are sealed). `oppu keys seal-existing` seals the
rows and files that are still plaintext, resumably; the server refuses to serve half-sealed data unless
OPPU_SEAL_ALLOW_PLAINTEXT is set.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("history_items") as batch:
        batch.add_column(sa.Column("sealed", sa.Text(), nullable=True))
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("sealed", sa.Text(), nullable=True))
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("sealed", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("sealed")
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("sealed")
    with op.batch_alter_table("history_items") as batch:
        batch.drop_column("sealed")
