"""Recovery plans.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

Frozen like every released revision: later schema changes are new revisions.

- ``recovery_plans``: one row per plan (unique name); its boot groups as JSON, the cron of its
  scheduled test runs and the slot that schedule last fired for.
- ``plan_runs``: one row per failover or test run of a plan (kind, state, the job, the click,
  when it ended, and the result per VM as JSON). Runs are history: no foreign key to the plan.

Kinds and states are validated in code (no CHECK constraint).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255
STATE = 32


def upgrade() -> None:
    op.create_table(
        "recovery_plans",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("test_cron", sa.String(NAME), nullable=True),
        sa.Column("test_last_slot", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recovery_plans")),
        sa.UniqueConstraint("name", name=op.f("uq_recovery_plans_name")),
    )
    op.create_table(
        "plan_runs",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("plan_id", sa.String(NAME), nullable=False),
        sa.Column("plan_name", sa.String(NAME), nullable=False),
        sa.Column("kind", sa.String(STATE), nullable=False),
        sa.Column("state", sa.String(STATE), nullable=False),
        sa.Column("job_id", sa.String(NAME), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan_runs")),
    )
    with op.batch_alter_table("plan_runs") as batch:
        batch.create_index(
            batch.f("ix_plan_runs_plan_id_requested_at"), ["plan_id", "requested_at"], unique=False
        )


def downgrade() -> None:
    # Plans are configuration the user made; before 0010 there is nowhere to keep them.
    with op.batch_alter_table("plan_runs") as batch:
        batch.drop_index("ix_plan_runs_plan_id_requested_at")
    op.drop_table("plan_runs")
    op.drop_table("recovery_plans")
