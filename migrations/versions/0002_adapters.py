"""adapters and adapter heads

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "adapter_heads",
        sa.Column("owner_key", sa.String(32), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=True),
        sa.Column("current_version", sa.Integer(), nullable=True),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("owner_key", name=op.f("pk_adapter_heads")),
        sa.ForeignKeyConstraint(
            ["user_pk"], ["users.id"], ondelete="CASCADE", name=op.f("fk_adapter_heads_user_pk_users")
        ),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_key", sa.String(32), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("base_fingerprint", sa.String(64), nullable=False),
        sa.Column("nbytes", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("shared_version", sa.Integer(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.ForeignKeyConstraint(
            ["user_pk"], ["users.id"], ondelete="CASCADE", name=op.f("fk_adapters_user_pk_users")
        ),
        sa.UniqueConstraint("owner_key", "version", name="uq_adapters_owner_version"),
    )
    op.create_index(op.f("ix_adapters_owner_key"), "adapters", ["owner_key"])
    op.create_index(op.f("ix_adapters_user_pk"), "adapters", ["user_pk"])


def downgrade() -> None:
    op.drop_index(op.f("ix_adapters_user_pk"), table_name="adapters")
    op.drop_index(op.f("ix_adapters_owner_key"), table_name="adapters")
    op.drop_table("adapters")
    op.drop_table("adapter_heads")
