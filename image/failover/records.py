"""How a failover session is written down: timestamps in its catalog ``details`` and the record
as the plain dict the API and the manager's readers get."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from appliance.catalog.records import FailoverSessionRecord


def now_iso() -> str:
    """Now, to the second (state changes: ``failed_at``, ``stopped_at``, ...)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def epoch_iso(epoch: float) -> str:
    """An epoch time to the millisecond (the boot's measured instants)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def record_dict(record: FailoverSessionRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "asset": record.asset,
        "point_id": record.point_id,
        "state": record.state,
        "started_at": record.started_at.isoformat(),
        "details": dict(record.details),
    }
