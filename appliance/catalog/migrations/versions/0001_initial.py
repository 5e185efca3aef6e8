"""The catalog's first schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Frozen: once released, this file never changes; later schema changes are new revisions. It
spells out plain SQLAlchemy types instead of importing the models, so that editing the models
can never rewrite history. ``sa.DateTime(timezone=True)`` is what the models' ``UTCDateTime``
stores.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255
STATE = 32


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "assets",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("kind", sa.String(STATE), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        _timestamp("created_at"),
        sa.Column("description", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_assets")),
    )
    op.create_table(
        "stores",
        sa.Column("store_id", sa.String(NAME), nullable=False),
        sa.Column("location_kind", sa.String(STATE), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("store_id", name=op.f("pk_stores")),
    )
    op.create_table(
        "recovery_points",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("asset", sa.String(NAME), nullable=False),
        sa.Column("kind", sa.String(STATE), nullable=False),
        sa.Column("mode", sa.String(STATE), nullable=False),
        _timestamp("created_at"),
        sa.Column("parent_id", sa.String(NAME), nullable=True),
        sa.Column("base_full_id", sa.String(NAME), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("logical_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("file_count", sa.BigInteger(), nullable=False),
        sa.Column("warning_count", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(NAME), nullable=False),
        _timestamp("verified_at", nullable=True),
        sa.Column("verify_status", sa.String(NAME), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["asset"], ["assets.name"], name=op.f("fk_recovery_points_asset_assets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recovery_points")),
    )
    op.create_index(
        op.f("ix_recovery_points_asset_created_at"), "recovery_points", ["asset", "created_at"]
    )
    op.create_table(
        "point_copies",
        sa.Column("point_id", sa.String(NAME), nullable=False),
        sa.Column("store_id", sa.String(NAME), nullable=False),
        sa.Column("state", sa.String(STATE), nullable=False),
        _timestamp("added_at"),
        sa.ForeignKeyConstraint(
            ["point_id"],
            ["recovery_points.id"],
            name=op.f("fk_point_copies_point_id_recovery_points"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["store_id"], ["stores.store_id"], name=op.f("fk_point_copies_store_id_stores")
        ),
        sa.PrimaryKeyConstraint("point_id", "store_id", name=op.f("pk_point_copies")),
    )
    op.create_index(op.f("ix_point_copies_store_id"), "point_copies", ["store_id"])
    op.create_table(
        "policies",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("asset", sa.String(NAME), nullable=False),
        sa.Column("schedule", sa.JSON(), nullable=False),
        sa.Column("mode", sa.String(STATE), nullable=False),
        sa.Column("retention", sa.JSON(), nullable=False),
        sa.Column("rpo_seconds", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["asset"], ["assets.name"], name=op.f("fk_policies_asset_assets")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_policies")),
    )
    op.create_index(op.f("ix_policies_asset"), "policies", ["asset"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("kind", sa.String(NAME), nullable=False),
        sa.Column("state", sa.String(STATE), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        _timestamp("created_at"),
        _timestamp("started_at", nullable=True),
        _timestamp("finished_at", nullable=True),
        sa.Column("resource", sa.String(NAME), nullable=True),
        sa.Column("log_seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_state"), "jobs", ["state"])
    op.create_index(op.f("ix_jobs_created_at"), "jobs", ["created_at"])
    op.create_table(
        "job_log",
        sa.Column("job_id", sa.String(NAME), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        _timestamp("at"),
        sa.Column("level", sa.String(STATE), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_log_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_job_log")),
    )
    op.create_table(
        "pools",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("store_id", sa.String(NAME), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pools")),
    )
    op.create_table(
        "media",
        sa.Column("identity", sa.String(NAME), nullable=False),
        sa.Column("kind", sa.String(STATE), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        _timestamp("last_seen"),
        sa.PrimaryKeyConstraint("identity", name=op.f("pk_media")),
    )
    op.create_table(
        "users",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("role", sa.String(STATE), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_users")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("user_name", sa.String(NAME), nullable=False),
        sa.Column("hashed", sa.String(NAME), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        _timestamp("revoked_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["user_name"], ["users.name"], name=op.f("fk_api_tokens_user_name_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("hashed", name=op.f("uq_api_tokens_hashed")),
    )
    op.create_index(op.f("ix_api_tokens_user_name"), "api_tokens", ["user_name"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _timestamp("at"),
        sa.Column("actor", sa.String(NAME), nullable=False),
        sa.Column("action", sa.String(NAME), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_table(
        "failover_sessions",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("asset", sa.String(NAME), nullable=False),
        sa.Column("point_id", sa.String(NAME), nullable=False),
        sa.Column("state", sa.String(STATE), nullable=False),
        _timestamp("started_at"),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["asset"], ["assets.name"], name=op.f("fk_failover_sessions_asset_assets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_failover_sessions")),
    )
    op.create_index(op.f("ix_failover_sessions_asset"), "failover_sessions", ["asset"])


def downgrade() -> None:
    # Children before parents, so no foreign key is ever left dangling.
    op.drop_table("failover_sessions")
    op.drop_table("audit_log")
    op.drop_table("api_tokens")
    op.drop_table("users")
    op.drop_table("media")
    op.drop_table("pools")
    op.drop_table("job_log")
    op.drop_table("jobs")
    op.drop_table("policies")
    op.drop_table("point_copies")
    op.drop_table("recovery_points")
    op.drop_table("stores")
    op.drop_table("assets")
