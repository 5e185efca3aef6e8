"""Recovery points: IDs, manifests and their catalog records.

A point ID is 16 hex digits: 44 bits of milliseconds since the epoch then 20 random bits, so IDs
sort by creation time and two points made in the same millisecond still differ.
"""

from __future__ import annotations

import secrets
import socket
from datetime import UTC, datetime
from typing import Any

from appliance.catalog.records import PointRecord
from appliance.store import format as fmt


def new_point_id(now: datetime) -> str:
    millis = int(now.timestamp() * 1000) & ((1 << 44) - 1)
    return f"{millis:011x}{secrets.randbits(20):05x}"


def new_manifest(
    *,
    point_id: str,
    asset: str,
    kind: str,
    mode: str,
    created: datetime,
    parent: str | None,
    base_full: str | None,
    store_id: str,
    source: str,
) -> dict[str, Any]:
    return {
        "version": fmt.MANIFEST_VERSION,
        "point_id": point_id,
        "asset": asset,
        "kind": kind,
        "mode": mode,
        "created": created.astimezone(UTC).isoformat(),
        "parent": parent,
        "base_full": base_full,
        "store_id": store_id,
        "host": socket.gethostname(),
        "source": source,
    }


def record_from_manifest(manifest: dict[str, Any]) -> PointRecord:
    stats = manifest.get("stats", {})
    return PointRecord(
        id=manifest["point_id"],
        asset=manifest["asset"],
        kind=manifest["kind"],
        mode=manifest["mode"],
        created_at=datetime.fromisoformat(manifest["created"]),
        parent_id=manifest.get("parent"),
        base_full_id=manifest.get("base_full"),
        source=manifest.get("source", ""),
        logical_bytes=int(stats.get("logical_bytes", 0)),
        stored_bytes=int(stats.get("new_bytes", 0)),
        file_count=int(stats.get("files", 0)),
        warning_count=int(manifest.get("warning_count", 0)),
    )
