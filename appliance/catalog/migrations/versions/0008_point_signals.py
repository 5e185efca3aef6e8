"""Each point's change signals and a ransomware suspicion.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Frozen like every released revision: later schema changes are new revisions.

- ``recovery_points.signals``: what the backup measured against its parent (files new, changed,
  deleted, renamed, extensions gained, the share of new data that does not compress), as JSON.
- ``recovery_points.suspicion``: the reasons, in words, why the point looks like a ransomware
  attack (NULL: it does not).
- ``recovery_points.review``: who looked at a suspicious point, when, and their verdict
  (``expected`` or ``attack``).

All three are nullable: points made before 0008 have no signals and are never suspicious.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("recovery_points") as batch:
        batch.add_column(sa.Column("signals", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("suspicion", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("review", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recovery_points") as batch:
        batch.drop_column("review")
        batch.drop_column("suspicion")
        batch.drop_column("signals")
