"""Assets: the things the appliance protects (file trees and VMs).

An asset is created explicitly (the API) or implicitly with its first point
(:func:`ensure_asset_row`, used by the points repository and by `catalog rebuild`). It is deleted
only once it has no points and no policies left.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from appliance.catalog.database import Database, check_choice, check_name
from appliance.catalog.models import (
    AssetRow,
    PointRow,
)
from appliance.catalog.models_policies import PolicyAssetRow
from appliance.catalog.records import (
    ASSET_KINDS,
    AssetRecord,
)
from appliance.errors import Conflict, NotFound


def ensure_asset_row(db: Database, session: Session, name: str, kind: str, source: str) -> AssetRow:
    """The asset row ``name`` (locked), inserted if new; another kind is a :class:`Conflict`."""
    row = session.get(AssetRow, name, with_for_update=True)
    if row is None:
        row = AssetRow(name=name, kind=kind, source=source, created_at=db.now(), description=None)
        session.add(row)
        session.flush()
    elif row.kind != kind:
        raise Conflict(f"asset {name} is a {row.kind} asset, not {kind}", asset=name)
    return row


def asset_must_exist(session: Session, name: str) -> None:
    if session.get(AssetRow, name) is None:
        raise NotFound(f"asset {name} is not in the catalog", asset=name)


class AssetRepository:
    """Assets: add, update, delete, list."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def ensure_asset(self, name: str, kind: str, source: str = "") -> AssetRecord:
        """The asset ``name``, created if new; a non-empty ``source`` replaces the recorded one.

        An existing asset of another kind is a :class:`Conflict`.
        """
        check_name(name, "asset name")
        check_choice(kind, ASSET_KINDS, "asset kind")
        with self._db.session(write=True, conflict=f"asset {name} already exists") as session:
            row = ensure_asset_row(self._db, session, name, kind, source)
            if source and row.source != source:
                row.source = source
            return row.to_record()

    def add_asset(
        self, name: str, kind: str, source: str, description: str | None = None
    ) -> AssetRecord:
        """A new asset; an existing one of that name is a :class:`Conflict`."""
        check_name(name, "asset name")
        check_choice(kind, ASSET_KINDS, "asset kind")
        conflict = f"asset {name} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            if session.get(AssetRow, name, with_for_update=True) is not None:
                raise Conflict(conflict, asset=name)
            row = AssetRow(
                name=name,
                kind=kind,
                source=source,
                created_at=self._db.now(),
                description=description,
            )
            session.add(row)
            return row.to_record()

    def update_asset(self, name: str, source: str, description: str | None) -> AssetRecord:
        """Replace the asset's source and description (its kind never changes)."""
        with self._db.session(write=True) as session:
            row = session.get(AssetRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"asset {name} is not in the catalog", asset=name)
            row.source = source
            row.description = description
            return row.to_record()

    def delete_asset(self, name: str) -> None:
        """Forget an asset that has no recovery points and no policies left (else Conflict)."""
        with self._db.session(write=True) as session:
            row = session.get(AssetRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"asset {name} is not in the catalog", asset=name)
            points = session.scalar(
                select(func.count()).select_from(PointRow).where(PointRow.asset == name)
            )
            policies = session.scalar(
                select(func.count()).select_from(PolicyAssetRow).where(PolicyAssetRow.asset == name)
            )
            if points or policies:
                raise Conflict(
                    f"asset {name} still has {points} recovery point(s) and {policies} "
                    "policy(ies); delete or prune them first",
                    asset=name,
                    points=points,
                    policies=policies,
                )
            session.delete(row)

    def get_asset(self, name: str) -> AssetRecord:
        with self._db.session(write=False) as session:
            row = session.get(AssetRow, name)
            if row is None:
                raise NotFound(f"asset {name} is not in the catalog", asset=name)
            return row.to_record()

    def list_assets(self) -> list[AssetRecord]:
        with self._db.session(write=False) as session:
            rows = session.scalars(select(AssetRow).order_by(AssetRow.name))
            return [row.to_record() for row in rows]
