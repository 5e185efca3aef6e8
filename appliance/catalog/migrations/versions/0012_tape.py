"""Tape media pools, cartridges and media sets.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05

Frozen like every released revision: later schema changes are new revisions.

- ``tape_pools``: one row per media pool (allocation, retention days, and its schedule: cron,
  drive, which points, the last slot fired).
- ``tape_media``: one row per cartridge, keyed by barcode (label id, pool, set, sequence, state,
  place, slot, bytes written, write protection, points on it, times).
- ``tape_media_sets``: one row per media set (also a location of kind ``tape_set``), with the
  newest set catalog as JSON: where each object of the set lies is read from it.

States, allocations and places are validated in code (no CHECK constraint).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255
STATE = 32


def upgrade() -> None:
    op.create_table(
        "tape_pools",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("allocation", sa.String(STATE), nullable=False),
        sa.Column("retention_days", sa.Integer(), nullable=False),
        sa.Column("schedule", sa.String(NAME), nullable=True),
        sa.Column("schedule_drive", sa.String(NAME), nullable=True),
        sa.Column("points_rule", sa.JSON(), nullable=False),
        sa.Column("schedule_last_slot", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tape_pools")),
    )
    op.create_table(
        "tape_media",
        sa.Column("barcode", sa.String(NAME), nullable=False),
        sa.Column("label_id", sa.String(NAME), nullable=True),
        sa.Column("pool", sa.String(NAME), nullable=True),
        sa.Column("media_set_id", sa.String(NAME), nullable=True),
        sa.Column("sequence", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(STATE), nullable=False),
        sa.Column("place", sa.String(STATE), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.Column("bytes_written", sa.BigInteger(), nullable=False),
        sa.Column("write_protected", sa.Boolean(), nullable=False),
        sa.Column("point_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_written_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("barcode", name=op.f("pk_tape_media")),
    )
    with op.batch_alter_table("tape_media") as batch:
        batch.create_index(batch.f("ix_tape_media_media_set_id"), ["media_set_id"], unique=False)
    op.create_table(
        "tape_media_sets",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("pool", sa.String(NAME), nullable=False),
        sa.Column("store_id", sa.String(NAME), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("catalog", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tape_media_sets")),
    )
    with op.batch_alter_table("tape_media_sets") as batch:
        batch.create_index(batch.f("ix_tape_media_sets_pool"), ["pool"], unique=False)


def downgrade() -> None:
    # The tapes describe themselves: a scan after an upgrade again recreates these rows.
    with op.batch_alter_table("tape_media_sets") as batch:
        batch.drop_index("ix_tape_media_sets_pool")
    op.drop_table("tape_media_sets")
    with op.batch_alter_table("tape_media") as batch:
        batch.drop_index("ix_tape_media_media_set_id")
    op.drop_table("tape_media")
    op.drop_table("tape_pools")
