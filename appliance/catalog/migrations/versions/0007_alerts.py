"""Alerts: channels, rules and the alerts raised.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Frozen like every released revision: later schema changes are new revisions.

- ``alerts``: one row per alert (kind, subject, severity, message, details, first and last
  seen, how many times raised, when last sent, who acknowledged it and when, when resolved, and
  the delivery state per channel as JSON). At most one unresolved row per (kind, subject) is kept
  by the code (a partial unique index is not portable to SQLite's batch mode).
- ``alert_channels``: e-mail and webhook channels (unique name; settings without secrets, which
  stay in the data directory's secrets).
- ``alert_rules``: a rule per event kind that differs from its default.

Kinds, severities and channel kinds are validated in code (no CHECK constraint).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255
STATE = 32


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(NAME), nullable=False),
        sa.Column("subject", sa.String(NAME), nullable=False),
        sa.Column("severity", sa.String(STATE), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.String(NAME), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivery", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    with op.batch_alter_table("alerts") as batch:
        batch.create_index(batch.f("ix_alerts_kind_subject"), ["kind", "subject"], unique=False)
        batch.create_index(batch.f("ix_alerts_last_seen"), ["last_seen"], unique=False)
    op.create_table(
        "alert_channels",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("kind", sa.String(STATE), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_channels")),
        sa.UniqueConstraint("name", name=op.f("uq_alert_channels_name")),
    )
    op.create_table(
        "alert_rules",
        sa.Column("kind", sa.String(NAME), nullable=False),
        sa.Column("rule", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("kind", name=op.f("pk_alert_rules")),
    )


def downgrade() -> None:
    # Alerts are operational history, not data: before 0007 there is nowhere to keep them. The
    # channels' secrets files stay in the data directory until the channels are made again.
    op.drop_table("alert_rules")
    op.drop_table("alert_channels")
    with op.batch_alter_table("alerts") as batch:
        batch.drop_index("ix_alerts_last_seen")
        batch.drop_index("ix_alerts_kind_subject")
    op.drop_table("alerts")
