"""users, api keys, history items, profiles

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(32), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("user_id", name=op.f("uq_users_user_id")),
        sa.UniqueConstraint("storage_key", name=op.f("uq_users_storage_key")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.ForeignKeyConstraint(
            ["user_pk"], ["users.id"], ondelete="CASCADE", name=op.f("fk_api_keys_user_pk_users")
        ),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_user_pk"), "api_keys", ["user_pk"])
    op.create_table(
        "history_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("input", sa.Text(), nullable=True),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("timestamp", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_history_items")),
        sa.ForeignKeyConstraint(
            ["user_pk"], ["users.id"], ondelete="CASCADE", name=op.f("fk_history_items_user_pk_users")
        ),
        sa.UniqueConstraint("user_pk", "client_id", name="uq_history_items_user_client"),
    )
    op.create_index("ix_history_items_user_seq", "history_items", ["user_pk", "id"])
    op.create_table(
        "profiles",
        sa.Column("user_pk", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("user_pk", name=op.f("pk_profiles")),
        sa.ForeignKeyConstraint(
            ["user_pk"], ["users.id"], ondelete="CASCADE", name=op.f("fk_profiles_user_pk_users")
        ),
    )


def downgrade() -> None:
    op.drop_table("profiles")
    op.drop_index("ix_history_items_user_seq", table_name="history_items")
    op.drop_table("history_items")
    op.drop_index(op.f("ix_api_keys_user_pk"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("users")
