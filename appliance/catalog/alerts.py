"""Alerts, alert channels and alert rules (revision 0007).

An alert is keyed by (kind, subject) while it is unresolved: :meth:`AlertRepository.raise_alert`
updates the open alert of the key or makes a new one, under a write lock, so two sources raising
the same event at once still make one alert. What is sent, and when, is decided by
:mod:`appliance.alerts.rules`; this repository only stores the outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select

from appliance.alerts.events import AlertEvent, check_severity
from appliance.alerts.records import (
    ALERT_STATES,
    CHANNEL_KINDS,
    AlertChannelRecord,
    AlertRecord,
)
from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.models_alerts import AlertChannelRow, AlertRow, AlertRuleRow
from appliance.errors import NotFound


class AlertRepository:
    """Alerts, channels and rules."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # --- alerts -----------------------------------------------------------------------------------

    def raise_alert(self, event: AlertEvent, severity: str) -> tuple[AlertRecord, bool]:
        """Record ``event``: (the alert, True when it is new). An open alert of the event's key
        is updated (message, details, severity, last seen, count); otherwise a new one is made.
        A ``resolved`` event resolves the open alert instead (see :meth:`resolve_alerts`)."""
        check_severity(severity)
        check_name(event.subject, "alert subject")
        at = utc(event.at, "the event's time")
        with self._db.session(write=True) as session:
            row = session.scalars(
                select(AlertRow)
                .where(
                    AlertRow.kind == event.kind,
                    AlertRow.subject == event.subject,
                    AlertRow.resolved_at.is_(None),
                )
                .with_for_update()
            ).first()
            if row is not None:
                row.message = event.message
                row.details = dict(event.details)
                row.severity = severity
                row.last_seen = max(row.last_seen, at)
                row.count += 1
                return row.to_record(), False
            row = AlertRow(
                kind=event.kind,
                subject=event.subject,
                severity=severity,
                message=event.message,
                details=dict(event.details),
                first_seen=at,
                last_seen=at,
                count=1,
                delivery={},
            )
            session.add(row)
            session.flush()
            return row.to_record(), True

    def find_open_alert(self, kind: str, subject: str) -> AlertRecord | None:
        with self._db.session(write=False) as session:
            row = session.scalars(
                select(AlertRow).where(
                    AlertRow.kind == kind,
                    AlertRow.subject == subject,
                    AlertRow.resolved_at.is_(None),
                )
            ).first()
            return row.to_record() if row is not None else None

    def get_alert(self, alert_id: int) -> AlertRecord:
        with self._db.session(write=False) as session:
            row = session.get(AlertRow, alert_id)
            if row is None:
                raise NotFound(f"alert {alert_id} does not exist", alert=alert_id)
            return row.to_record()

    def list_alerts(
        self, state: str | None = None, severity: str | None = None, limit: int = 200
    ) -> list[AlertRecord]:
        """Newest (last seen) first; ``state``: open (not acknowledged), acknowledged (not
        resolved) or resolved."""
        query = select(AlertRow)
        if state is not None:
            check_choice(state, frozenset(ALERT_STATES), "alert state")
            if state == "resolved":
                query = query.where(AlertRow.resolved_at.is_not(None))
            else:
                query = query.where(AlertRow.resolved_at.is_(None))
                ack = AlertRow.acknowledged_at
                query = query.where(ack.is_(None) if state == "open" else ack.is_not(None))
        if severity is not None:
            query = query.where(AlertRow.severity == check_severity(severity))
        query = query.order_by(AlertRow.last_seen.desc(), AlertRow.id.desc()).limit(limit)
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def count_open_alerts(self) -> dict[str, int]:
        """Unresolved, unacknowledged alerts by severity."""
        with self._db.session(write=False) as session:
            rows = session.execute(
                select(AlertRow.severity, func.count())
                .where(AlertRow.resolved_at.is_(None), AlertRow.acknowledged_at.is_(None))
                .group_by(AlertRow.severity)
            ).all()
        return {str(severity): int(count) for severity, count in rows}

    def open_alert_keys(self, kinds: Iterable[str]) -> list[tuple[str, str]]:
        with self._db.session(write=False) as session:
            rows = session.execute(
                select(AlertRow.kind, AlertRow.subject).where(
                    AlertRow.resolved_at.is_(None), AlertRow.kind.in_(sorted(set(kinds)))
                )
            ).all()
        return [(str(k), str(s)) for k, s in rows]

    def unresolved_alerts(self) -> list[AlertRecord]:
        with self._db.session(write=False) as session:
            rows = session.scalars(select(AlertRow).where(AlertRow.resolved_at.is_(None)))
            return [row.to_record() for row in rows]

    def record_delivery(
        self, alert_id: int, channel_id: str, outcome: dict[str, Any], *, sent_at: datetime | None
    ) -> AlertRecord:
        """Store the outcome of sending alert ``alert_id`` to ``channel_id``; ``sent_at`` (the
        time it was sent, None when it was not) moves the alert's last-sent time."""
        with self._db.session(write=True) as session:
            row = session.get(AlertRow, alert_id, with_for_update=True)
            if row is None:
                raise NotFound(f"alert {alert_id} does not exist", alert=alert_id)
            row.delivery = {**row.delivery, channel_id: dict(outcome)}
            if sent_at is not None:
                row.last_sent_at = utc(sent_at, "the time sent")
            return row.to_record()

    def acknowledge_alert(self, alert_id: int, by: str) -> AlertRecord:
        """Mark the alert seen by ``by`` (repeats stop); acknowledging twice keeps the first."""
        with self._db.session(write=True) as session:
            row = session.get(AlertRow, alert_id, with_for_update=True)
            if row is None:
                raise NotFound(f"alert {alert_id} does not exist", alert=alert_id)
            if row.acknowledged_at is None:
                row.acknowledged_by = by
                row.acknowledged_at = self._db.now()
            return row.to_record()

    def resolve_alert(self, alert_id: int, at: datetime) -> AlertRecord:
        """Resolve alert ``alert_id`` (by hand); an already resolved one keeps its time."""
        when = utc(at, "the time resolved")
        with self._db.session(write=True) as session:
            row = session.get(AlertRow, alert_id, with_for_update=True)
            if row is None:
                raise NotFound(f"alert {alert_id} does not exist", alert=alert_id)
            if row.resolved_at is None:
                row.resolved_at = when
            return row.to_record()

    def resolve_alerts(self, kind: str, subject: str, at: datetime) -> int:
        """Resolve the open alert of (kind, subject), if any; returns how many were resolved."""
        when = utc(at, "the time resolved")
        with self._db.session(write=True) as session:
            rows = session.scalars(
                select(AlertRow)
                .where(
                    AlertRow.kind == kind,
                    AlertRow.subject == subject,
                    AlertRow.resolved_at.is_(None),
                )
                .with_for_update()
            ).all()
            for row in rows:
                row.resolved_at = when
            return len(rows)

    # --- channels ---------------------------------------------------------------------------------

    def add_alert_channel(
        self, name: str, kind: str, settings: dict[str, Any], *, enabled: bool = True
    ) -> AlertChannelRecord:
        check_name(name, "channel name")
        check_choice(kind, CHANNEL_KINDS, "channel kind")
        conflict = f"an alert channel named {name!r} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            row = AlertChannelRow(
                id=uuid.uuid4().hex[:12],
                name=name,
                kind=kind,
                enabled=enabled,
                settings=dict(settings),
                created_at=self._db.now(),
            )
            session.add(row)
            session.flush()
            return row.to_record()

    def get_alert_channel(self, channel_id: str) -> AlertChannelRecord:
        with self._db.session(write=False) as session:
            row = session.get(AlertChannelRow, channel_id)
            if row is None:
                raise NotFound(f"alert channel {channel_id} does not exist", channel=channel_id)
            return row.to_record()

    def list_alert_channels(self) -> list[AlertChannelRecord]:
        with self._db.session(write=False) as session:
            rows = session.scalars(select(AlertChannelRow).order_by(AlertChannelRow.name))
            return [row.to_record() for row in rows]

    def update_alert_channel(
        self,
        channel_id: str,
        *,
        name: str | None = None,
        enabled: bool | None = None,
        settings: dict[str, Any] | None = None,
    ) -> AlertChannelRecord:
        if name is not None:
            check_name(name, "channel name")
        conflict = f"an alert channel named {name!r} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            row = session.get(AlertChannelRow, channel_id, with_for_update=True)
            if row is None:
                raise NotFound(f"alert channel {channel_id} does not exist", channel=channel_id)
            if name is not None:
                row.name = name
            if enabled is not None:
                row.enabled = enabled
            if settings is not None:
                row.settings = dict(settings)
            session.flush()
            return row.to_record()

    def delete_alert_channel(self, channel_id: str) -> None:
        with self._db.session(write=True) as session:
            gone = session.execute(delete(AlertChannelRow).where(AlertChannelRow.id == channel_id))
            if not gone.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"alert channel {channel_id} does not exist", channel=channel_id)

    # --- rules ------------------------------------------------------------------------------------

    def alert_rules(self) -> dict[str, dict[str, Any]]:
        """The stored rules by event kind (kinds not stored use their defaults)."""
        with self._db.session(write=False) as session:
            return {row.kind: dict(row.rule) for row in session.scalars(select(AlertRuleRow))}

    def put_alert_rules(self, rules: dict[str, dict[str, Any]]) -> None:
        """Replace the stored rules with ``rules`` (validated by the caller)."""
        with self._db.session(write=True) as session:
            session.execute(delete(AlertRuleRow))
            for kind, rule in sorted(rules.items()):
                session.add(AlertRuleRow(kind=kind, rule=dict(rule)))
