"""Block pools and their usage history.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Frozen like every released revision: later schema changes are new revisions.

- ``pools`` gains what a pool of its own disks is: ``fs_uuid`` (the filesystem it is mounted by,
  unique), ``fs_type`` (ext4, xfs, btrfs), ``profile`` (single, raid1, raid10), ``members`` (a
  JSON list of the stable identities of its disks, in btrfs device-id order), ``location_id``
  (the store location on it; no foreign key, like ``store_id``) and ``mountpoint``. All are
  nullable: existing rows are directory pools (the data directory's ``default``) and keep NULLs.
- ``pool_usage``: samples of a pool's used and total bytes, keyed by (pool, time), removed with
  their pool; the growth forecast is made from them.

Fs types and profiles are validated in code (no CHECK constraint).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255
STATE = 32


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("fs_uuid", sa.String(NAME), nullable=True))
        batch.add_column(sa.Column("fs_type", sa.String(STATE), nullable=True))
        batch.add_column(sa.Column("profile", sa.String(STATE), nullable=True))
        batch.add_column(sa.Column("members", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("location_id", sa.String(NAME), nullable=True))
        batch.add_column(sa.Column("mountpoint", sa.Text(), nullable=True))
        batch.create_index(batch.f("ix_pools_fs_uuid"), ["fs_uuid"], unique=True)
    op.create_table(
        "pool_usage",
        sa.Column("pool", sa.String(NAME), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_bytes", sa.BigInteger(), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool"], ["pools.name"], name=op.f("fk_pool_usage_pool_pools"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("pool", "at", name=op.f("pk_pool_usage")),
    )


def downgrade() -> None:
    op.drop_table("pool_usage")
    # A block pool is not a folder of the data directory: before 0006 it cannot be described,
    # so its row goes (the disks and the store on them are left alone; `appliance pool import`
    # finds them again after an upgrade).
    op.execute("DELETE FROM pools WHERE fs_uuid IS NOT NULL")
    with op.batch_alter_table("pools") as batch:
        batch.drop_index("ix_pools_fs_uuid")
        batch.drop_column("mountpoint")
        batch.drop_column("location_id")
        batch.drop_column("members")
        batch.drop_column("profile")
        batch.drop_column("fs_type")
        batch.drop_column("fs_uuid")
