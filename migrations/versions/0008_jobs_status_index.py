"""jobs: an index on (status, finished_at) for the reaper's scans by status and its pruning of finished jobs
past OPPU_JOB_KEEP_S (every scan read the whole table, which was never pruned).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_status_finished_at", "jobs", ["status", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_finished_at", table_name="jobs")
