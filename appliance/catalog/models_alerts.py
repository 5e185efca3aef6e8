"""The alert tables (revision 0007), kept apart from ``models`` so that module stays small.

Imported by the alert repository (so by :class:`~appliance.catalog.Catalog`) and by the
migration environment, which puts these tables in the same metadata as every other model.

- ``alerts``: one row per alert; at most one row per (kind, subject) is unresolved (the
  repository keeps it so under a write lock). ``delivery`` is the per-channel state (see
  :mod:`appliance.alerts.records`).
- ``alert_channels``: e-mail and webhook channels; ``settings`` holds no secret.
- ``alert_rules``: the rules changed from their defaults, one row per event kind.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from appliance.alerts.records import AlertChannelRecord, AlertRecord
from appliance.catalog.models import NAME, STATE, Base, UTCDateTime


class AlertRow(Base):
    __tablename__ = "alerts"
    __table_args__ = (Index(None, "kind", "subject"), Index(None, "last_seen"))

    # Integer, not BigInteger: only SQLite's INTEGER PRIMARY KEY autoincrements.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(NAME))
    subject: Mapped[str] = mapped_column(String(NAME))
    severity: Mapped[str] = mapped_column(String(STATE))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(Integer)
    last_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(NAME), nullable=True)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivery: Mapped[dict[str, Any]] = mapped_column(JSON)

    def to_record(self) -> AlertRecord:
        return AlertRecord(
            id=self.id,
            kind=self.kind,
            subject=self.subject,
            severity=self.severity,
            message=self.message,
            details=dict(self.details),
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            count=self.count,
            last_sent_at=self.last_sent_at,
            acknowledged_by=self.acknowledged_by,
            acknowledged_at=self.acknowledged_at,
            resolved_at=self.resolved_at,
            delivery={k: dict(v) for k, v in self.delivery.items()},
        )


class AlertChannelRow(Base):
    __tablename__ = "alert_channels"

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME), unique=True)
    kind: Mapped[str] = mapped_column(String(STATE))
    enabled: Mapped[bool] = mapped_column(Boolean)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def to_record(self) -> AlertChannelRecord:
        return AlertChannelRecord(
            id=self.id,
            name=self.name,
            kind=self.kind,
            enabled=self.enabled,
            settings=dict(self.settings),
            created_at=self.created_at,
        )


class AlertRuleRow(Base):
    __tablename__ = "alert_rules"

    kind: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    rule: Mapped[dict[str, Any]] = mapped_column(JSON)
