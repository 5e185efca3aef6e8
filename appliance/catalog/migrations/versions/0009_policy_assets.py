"""One policy for several assets.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05

Frozen like every released revision: later schema changes are new revisions.

- ``policy_assets``: the assets a policy covers, one row per (policy, asset) with its
  ``position`` in the policy's list; removed with their policy. Each existing policy's single
  ``asset`` becomes its row at position 0, so every policy survives the upgrade unchanged.
- ``policies.asset`` (and its index and foreign key) goes.

Downgrade: a policy keeps its first asset (position 0); a policy's further assets cannot be
described before 0009 and are dropped from it (the assets themselves stay).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255


def _rows(query: str) -> list[dict[str, object]]:
    return [dict(row._mapping) for row in op.get_bind().execute(sa.text(query))]


def _restore_schedule_state(saved: list[dict[str, object]]) -> None:
    # SQLite rebuilds ``policies`` in batch mode; with foreign keys on, dropping the old table
    # cascades to ``schedule_state``. Its rows are put back as read (the same stored text).
    op.execute("DELETE FROM schedule_state")
    for row in saved:
        op.get_bind().execute(
            sa.text(
                "INSERT INTO schedule_state (policy, entry, last_fired_at) "
                "VALUES (:policy, :entry, :last_fired_at)"
            ),
            row,
        )


def upgrade() -> None:
    policies = _rows("SELECT name, asset FROM policies")
    state = _rows("SELECT policy, entry, last_fired_at FROM schedule_state")
    with op.batch_alter_table("policies") as batch:
        batch.drop_index("ix_policies_asset")
        batch.drop_constraint("fk_policies_asset_assets", type_="foreignkey")
        batch.drop_column("asset")
    _restore_schedule_state(state)
    op.create_table(
        "policy_assets",
        sa.Column("policy", sa.String(NAME), nullable=False),
        sa.Column("asset", sa.String(NAME), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["asset"], ["assets.name"], name=op.f("fk_policy_assets_asset_assets")
        ),
        sa.ForeignKeyConstraint(
            ["policy"],
            ["policies.name"],
            name=op.f("fk_policy_assets_policy_policies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("policy", "asset", name=op.f("pk_policy_assets")),
    )
    op.create_index(op.f("ix_policy_assets_asset"), "policy_assets", ["asset"])
    for policy in policies:
        op.get_bind().execute(
            sa.text("INSERT INTO policy_assets (policy, asset, position) VALUES (:p, :a, 0)"),
            {"p": policy["name"], "a": policy["asset"]},
        )


def downgrade() -> None:
    first = _rows(
        "SELECT policy, asset FROM policy_assets pa WHERE position = "
        "(SELECT MIN(position) FROM policy_assets WHERE policy = pa.policy)"
    )
    state = _rows("SELECT policy, entry, last_fired_at FROM schedule_state")
    op.drop_index(op.f("ix_policy_assets_asset"), table_name="policy_assets")
    op.drop_table("policy_assets")
    with op.batch_alter_table("policies") as batch:
        batch.add_column(sa.Column("asset", sa.String(NAME), nullable=True))
    for row in first:
        op.get_bind().execute(
            sa.text("UPDATE policies SET asset = :a WHERE name = :p"),
            {"a": row["asset"], "p": row["policy"]},
        )
    # A policy left without an asset cannot be described before 0009.
    op.execute("DELETE FROM policies WHERE asset IS NULL")
    state = [row for row in state if row["policy"] in {r["policy"] for r in first}]
    with op.batch_alter_table("policies") as batch:
        batch.alter_column("asset", existing_type=sa.String(NAME), nullable=False)
        batch.create_foreign_key(batch.f("fk_policies_asset_assets"), "assets", ["asset"], ["name"])
        batch.create_index(batch.f("ix_policies_asset"), ["asset"])
    _restore_schedule_state(state)
