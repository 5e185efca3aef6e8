"""The catalog: an SQL index over the stores (SQLite by default, PostgreSQL for large sites).

Use :class:`Catalog` (``Catalog.open(url)``) and the frozen records it returns; nothing else of
this package is public. SQLAlchemy and Alembic are imported only inside this package (an
import-linter contract enforces it).

``Catalog`` is imported lazily (on first access of ``appliance.catalog.Catalog``), so that code
which only builds or reads records -- ``from appliance.catalog.records import PointRecord`` or
``from appliance.catalog import PointRecord`` -- does not load SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from appliance.catalog.records import (
    AssetRecord,
    AuditRecord,
    CopyRecord,
    FailoverSessionRecord,
    JobLogRecord,
    JobRecord,
    LocationRecord,
    MediaRecord,
    PointRecord,
    PolicyRecord,
    PoolRecord,
    PoolUsageRecord,
    SessionRecord,
    StoreRecord,
    TokenRecord,
    UserRecord,
)

if TYPE_CHECKING:
    from appliance.catalog.catalog import Catalog


def __getattr__(name: str) -> Any:
    if name == "Catalog":
        from appliance.catalog.catalog import Catalog

        return Catalog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AssetRecord",
    "AuditRecord",
    "Catalog",
    "CopyRecord",
    "FailoverSessionRecord",
    "JobLogRecord",
    "JobRecord",
    "LocationRecord",
    "MediaRecord",
    "PointRecord",
    "PolicyRecord",
    "PoolRecord",
    "PoolUsageRecord",
    "SessionRecord",
    "StoreRecord",
    "TokenRecord",
    "UserRecord",
]
