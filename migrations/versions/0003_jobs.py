"""training jobs; adapters.job_id for idempotent publish

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("owner_key", sa.String(40), nullable=False),
        sa.Column("user_pk", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cutoff_item_id", sa.Integer(), nullable=True),
        sa.Column("adapter_version", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.ForeignKeyConstraint(["user_pk"], ["users.id"], ondelete="CASCADE", name=op.f("fk_jobs_user_pk_users")),
    )
    op.create_index(
        "uq_jobs_active_owner", "jobs", ["owner_key"], unique=True, sqlite_where=ACTIVE, postgresql_where=ACTIVE
    )
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("job_id", sa.String(36), nullable=True))
        batch.create_unique_constraint(op.f("uq_adapters_job_id"), ["job_id"])


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_constraint(op.f("uq_adapters_job_id"), type_="unique")
        batch.drop_column("job_id")
    op.drop_index("uq_jobs_active_owner", table_name="jobs")
    op.drop_table("jobs")
