"""Locations, and copies keyed by location.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Frozen like every released revision: later schema changes are new revisions.

- ``locations``: one place that holds (part of) a store -- a pool directory, a block-device pool,
  a removable disk, a tape media set, an S3 bucket or a peer -- with its access mode and flags.
- ``point_copies`` is keyed by (point, location) instead of (point, store), so one store can
  hold a point in several places; it gains ``location_id``, ``storage_class``, ``retain_until``
  and ``verified_at``. ``store_id`` stays: the location's store, for store-keyed queries.
- ``media.location_id``: the location a removable medium belongs to (NULL: none yet).

Existing rows are migrated, not left without a location: every store gets its *home location*
(ID derived from the store ID, see ``records.home_location_id``), made from the store row
(kind ``pool`` -> ``pool_dir``, ``usb`` -> ``removable``, ``tape`` -> ``tape_set``, ``bucket``
-> ``s3_bucket``, ``peer`` -> ``peer``); its address and label come
from the store's pool row when a pool names the store, else from the store's location. Removable
kinds start offline, the others online. Every existing copy is attached to its store's home
location, after which ``point_copies.location_id`` is NOT NULL.

Copy states are validated in code (no CHECK constraint), so the wider state set (``archived``,
``recalling``, ``lost``) needs no schema change. The downgrade keeps one copy per point and
store (the oldest) and maps the new states back.
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255
STATE = 32

#: store location_kind -> (location kind, access, removable), as in ``records`` at 0004.
HOME_LOCATIONS = {
    "pool": ("pool_dir", "random", False),
    "usb": ("removable", "random", True),
    "tape": ("tape_set", "sequential", True),
    "bucket": ("s3_bucket", "random", False),
    "peer": ("peer", "random", False),
}


def _home_location_id(store_id: str) -> str:
    # Frozen: ``records.home_location_id`` derives the same ID for a store's home location.
    return uuid.uuid5(uuid.NAMESPACE_URL, f"appliance:store-home:{store_id}").hex


def upgrade() -> None:
    op.create_table(
        "locations",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("store_id", sa.String(NAME), nullable=False),
        sa.Column("kind", sa.String(STATE), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("access", sa.String(STATE), nullable=False),
        sa.Column("immutable", sa.Boolean(), nullable=False),
        sa.Column("removable", sa.Boolean(), nullable=False),
        sa.Column("offsite", sa.Boolean(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["store_id"], ["stores.store_id"], name=op.f("fk_locations_store_id_stores")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_locations")),
    )
    op.create_index(op.f("ix_locations_store_id"), "locations", ["store_id"])

    bind = op.get_bind()
    stores = bind.execute(sa.text("SELECT store_id, location_kind FROM stores")).all()
    for store_id, location_kind in stores:
        kind, access, removable = HOME_LOCATIONS.get(location_kind, ("pool_dir", "random", False))
        bind.execute(
            sa.text(
                "INSERT INTO locations (id, store_id, kind, address, access, immutable, "
                "removable, offsite, online, label, created_at, last_seen_at, details) "
                "SELECT :id, s.store_id, :kind, "
                "COALESCE((SELECT p.path FROM pools p WHERE p.store_id = s.store_id "
                "ORDER BY p.name LIMIT 1), s.location), "
                ":access, :false, :removable, :false, :online, "
                "COALESCE((SELECT p.name FROM pools p WHERE p.store_id = s.store_id "
                "ORDER BY p.name LIMIT 1), s.location), "
                "s.created_at, NULL, :details FROM stores s WHERE s.store_id = :store_id"
            ),
            {
                "id": _home_location_id(store_id),
                "kind": kind,
                "access": access,
                "false": False,
                "removable": removable,
                "online": not removable,
                "details": "{}",
                "store_id": store_id,
            },
        )

    with op.batch_alter_table("point_copies") as batch:
        batch.add_column(sa.Column("location_id", sa.String(NAME), nullable=True))
        batch.add_column(sa.Column("storage_class", sa.String(NAME), nullable=True))
        batch.add_column(sa.Column("retain_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
    bind.execute(
        sa.text(
            "UPDATE point_copies SET location_id = (SELECT l.id FROM locations l "
            "WHERE l.store_id = point_copies.store_id)"
        )
    )
    with op.batch_alter_table("point_copies") as batch:
        batch.alter_column("location_id", existing_type=sa.String(NAME), nullable=False)
        batch.drop_constraint("pk_point_copies", type_="primary")
        batch.create_primary_key("pk_point_copies", ["point_id", "location_id"])
        batch.create_foreign_key(
            batch.f("fk_point_copies_location_id_locations"), "locations", ["location_id"], ["id"]
        )
        batch.create_index(batch.f("ix_point_copies_location_id"), ["location_id"])

    with op.batch_alter_table("media") as batch:
        batch.add_column(sa.Column("location_id", sa.String(NAME), nullable=True))
        batch.create_foreign_key(
            batch.f("fk_media_location_id_locations"), "locations", ["location_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("media") as batch:
        batch.drop_constraint("fk_media_location_id_locations", type_="foreignkey")
        batch.drop_column("location_id")

    bind = op.get_bind()
    # One copy per (point, store) survives: the oldest one (a migrated copy: at the home location).
    bind.execute(
        sa.text(
            "DELETE FROM point_copies WHERE location_id <> (SELECT c.location_id "
            "FROM point_copies c WHERE c.point_id = point_copies.point_id "
            "AND c.store_id = point_copies.store_id "
            "ORDER BY c.added_at, c.location_id LIMIT 1)"
        )
    )
    bind.execute(
        sa.text(
            "UPDATE point_copies SET state = CASE WHEN state = 'lost' THEN 'deleted' "
            "ELSE 'present' END WHERE state IN ('archived', 'recalling', 'lost')"
        )
    )
    with op.batch_alter_table("point_copies") as batch:
        batch.drop_index("ix_point_copies_location_id")
        batch.drop_constraint("fk_point_copies_location_id_locations", type_="foreignkey")
        batch.drop_constraint("pk_point_copies", type_="primary")
        batch.create_primary_key("pk_point_copies", ["point_id", "store_id"])
    with op.batch_alter_table("point_copies") as batch:
        batch.drop_column("verified_at")
        batch.drop_column("retain_until")
        batch.drop_column("storage_class")
        batch.drop_column("location_id")

    op.drop_index("ix_locations_store_id", table_name="locations")
    op.drop_table("locations")
