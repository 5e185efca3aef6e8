"""Accounts can be disabled.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Frozen like every released revision: later schema changes are new revisions.

- ``users.disabled_at``: when an admin disabled the account (NULL: enabled). A disabled user
  cannot sign in, and disabling ends their sessions and revokes their API tokens.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("disabled_at")
