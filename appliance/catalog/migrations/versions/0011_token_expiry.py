"""API tokens can expire.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05

Frozen like every released revision: later schema changes are new revisions.

- ``api_tokens.expires_at``: when the token stops being accepted (NULL: it never expires). An
  expired token is refused like a revoked one, and the alert evaluation warns before the day.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("expires_at")
