"""Jobs that can wait, checkpoints and attempts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Frozen like every released revision: later schema changes are new revisions.

- ``jobs.wait_reason``: why a ``waiting`` job waits (a bucket thaw, a disk to insert, a tape to
  load, a retry's backoff); NULL when the job does not wait.
- ``jobs.wake_at``: when a waiting job is queued again by itself (NULL: only an outside event,
  such as a disk being inserted, wakes it).
- ``jobs.checkpoint``: the JSON document the work function saved last; a job resumed after a wait
  or an interruption starts from it (NULL: none).
- ``jobs.attempts``: how many times the job started running (NULL on older rows reads as 0).

Job states are validated in code (no CHECK constraint), so the new ``waiting`` state needs no
schema change. All four columns are nullable: existing rows need no values.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("wait_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("wake_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("checkpoint", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=True))


def downgrade() -> None:
    # A waiting job has no state to go back to before 0005: it is queued again (without its
    # checkpoint, it starts over).
    op.execute("UPDATE jobs SET state = 'queued' WHERE state = 'waiting'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("attempts")
        batch.drop_column("checkpoint")
        batch.drop_column("wake_at")
        batch.drop_column("wait_reason")
