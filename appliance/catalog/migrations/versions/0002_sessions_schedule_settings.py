"""Browser sessions, schedule state and the settings document.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Frozen like every released revision: later schema changes are new revisions.

- ``sessions``: signed-in browser sessions of the service, keyed by the SHA-256 of the cookie
  value (the cookie itself is never stored), with the hash of the session's CSRF token.
- ``schedule_state``: when each schedule entry of each policy last fired, so that a restart
  neither runs a slot twice nor skips one silently.
- ``settings``: small JSON documents of appliance settings, by key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("hashed", sa.String(NAME), nullable=False),
        sa.Column("user_name", sa.String(NAME), nullable=False),
        sa.Column("csrf_hashed", sa.String(NAME), nullable=False),
        _timestamp("created_at"),
        _timestamp("expires_at"),
        _timestamp("last_seen_at"),
        sa.ForeignKeyConstraint(
            ["user_name"],
            ["users.name"],
            name=op.f("fk_sessions_user_name_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("hashed", name=op.f("pk_sessions")),
    )
    op.create_index(op.f("ix_sessions_expires_at"), "sessions", ["expires_at"])
    op.create_index(op.f("ix_sessions_user_name"), "sessions", ["user_name"])
    op.create_table(
        "schedule_state",
        sa.Column("policy", sa.String(NAME), nullable=False),
        sa.Column("entry", sa.String(NAME), nullable=False),
        _timestamp("last_fired_at"),
        sa.ForeignKeyConstraint(
            ["policy"],
            ["policies.name"],
            name=op.f("fk_schedule_state_policy_policies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("policy", "entry", name=op.f("pk_schedule_state")),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(NAME), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_settings")),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("schedule_state")
    op.drop_index(op.f("ix_sessions_user_name"), table_name="sessions")
    op.drop_index(op.f("ix_sessions_expires_at"), table_name="sessions")
    op.drop_table("sessions")
