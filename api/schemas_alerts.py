"""Schemas of the alerts API: alerts, channels (never their secrets), rules, the summary."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr

Severity = Literal["critical", "warning", "info"]


class DeliveryPublic(BaseModel):
    channel_id: str
    channel: str | None = None
    #: sent, failed (retried at ``next_retry``) or given_up.
    state: str
    attempts: int
    at: datetime | None = None
    error: str | None = None
    next_retry: datetime | None = None


class AlertPublic(BaseModel):
    id: int
    kind: str
    title: str
    severity: str
    subject: str
    message: str
    details: dict[str, Any]
    #: open, acknowledged or resolved.
    state: str
    first_seen: datetime
    last_seen: datetime
    count: int
    last_sent_at: datetime | None
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    delivery: list[DeliveryPublic]


class AlertCounts(BaseModel):
    """Open (unacknowledged, unresolved) alerts by severity, for the navigation badge."""

    total: int
    critical: int = 0
    warning: int = 0
    info: int = 0


class EmailSettings(BaseModel):
    host: str = Field(min_length=1, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["starttls", "tls"] = "starttls"
    username: str = Field(default="", max_length=255)
    sender: str = Field(min_length=3, max_length=255)
    recipients: list[str] = Field(min_length=1, max_length=20)
    #: An absolute path of PEM certificates to verify the server with (empty: the system's).
    ca_file: str = Field(default="", max_length=4096)


class WebhookSettings(BaseModel):
    preset: Literal["generic", "ntfy", "gotify", "slack", "teams"] = "generic"
    timeout: float = Field(default=15.0, gt=0, le=60)


class ChannelCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    kind: Literal["email", "webhook"]
    enabled: bool = True
    email: EmailSettings | None = None
    webhook: WebhookSettings | None = None
    #: The SMTP password (write-only).
    password: SecretStr | None = None
    #: The webhook's address (write-only: its path or query is often the token).
    url: SecretStr | None = None
    #: A key to sign webhook bodies with (HMAC-SHA256; write-only).
    hmac_key: SecretStr | None = None


class ChannelUpdate(BaseModel):
    """What to change; a secret left out keeps its value, an empty one removes it."""

    name: str | None = Field(default=None, min_length=1, max_length=100)
    enabled: bool | None = None
    email: EmailSettings | None = None
    webhook: WebhookSettings | None = None
    password: SecretStr | None = None
    url: SecretStr | None = None
    hmac_key: SecretStr | None = None


class ChannelPublic(BaseModel):
    id: str
    name: str
    kind: str
    enabled: bool
    settings: dict[str, Any]
    #: Which secrets are set (their values are never shown).
    secrets_set: list[str]
    #: The webhook's host, so the page can say where it posts without showing the token.
    url_host: str | None = None
    created_at: datetime


class ChannelTestResult(BaseModel):
    ok: bool
    #: Why it failed, in words ("SMTP server refused the login ...").
    error: str | None = None
    alert: int


class RulePublic(BaseModel):
    kind: str
    title: str
    enabled: bool
    severity: Severity
    #: Channel ids; empty: every enabled channel.
    channels: list[str]
    #: The same alert is not sent again within this many seconds while it is open (0: never).
    repeat_seconds: int
    default_severity: Severity


class RuleUpdate(BaseModel):
    kind: str = Field(min_length=1, max_length=64)
    enabled: bool
    severity: Severity
    channels: list[str] = Field(default_factory=list, max_length=20)
    repeat_seconds: int = Field(ge=0, le=30 * 86400)


class SummaryPublic(BaseModel):
    frequency: Literal["off", "daily", "weekly"]
    hour: int = Field(ge=0, le=23)
