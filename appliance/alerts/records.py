"""Frozen records of alerts and alert channels, as the catalog returns them.

``delivery`` maps a channel id to the state of sending this alert there::

    {"state": "sent" | "failed" | "given_up", "attempts": 2, "at": "<iso time of the last try>",
     "error": "SMTP server refused the login", "next_retry": "<iso time>" | None}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ALERT_STATES = ("open", "acknowledged", "resolved")
CHANNEL_KINDS = frozenset({"email", "webhook"})


@dataclass(frozen=True)
class AlertRecord:
    id: int
    kind: str
    subject: str
    severity: str
    message: str
    details: dict[str, Any]
    first_seen: datetime
    last_seen: datetime
    count: int
    last_sent_at: datetime | None = None
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    resolved_at: datetime | None = None
    delivery: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def state(self) -> str:
        if self.resolved_at is not None:
            return "resolved"
        return "acknowledged" if self.acknowledged_at is not None else "open"


@dataclass(frozen=True)
class AlertChannelRecord:
    """Where alerts are sent. ``settings`` holds no secret: an SMTP password or a webhook URL
    (whose path often is the token) lives in the data directory's secrets (mode 0600)."""

    id: str
    name: str
    kind: str
    enabled: bool
    settings: dict[str, Any]
    created_at: datetime
