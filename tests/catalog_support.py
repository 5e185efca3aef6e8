"""What the catalog's tests share: a clock moved by hand and point records made short."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.catalog import Catalog, PointRecord

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """The catalog's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def open_catalog(catalog_url: str, clock: FakeClock) -> Iterator[Catalog]:
    """The body of a module's ``catalog`` fixture."""
    with Catalog.open(catalog_url, clock=clock) as opened:
        yield opened


def point(point_id: str, asset: str = "docs", *, minutes: float = 0, **fields: Any) -> PointRecord:
    fields.setdefault("kind", "files")
    fields.setdefault("mode", "full")
    fields.setdefault("created_at", T0 + timedelta(minutes=minutes))
    return PointRecord(id=point_id, asset=asset, **fields)


def ids(points: list[PointRecord]) -> list[str]:
    return [p.id for p in points]
