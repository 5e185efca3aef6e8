"""Rules per event kind, repeat suppression and the delivery retry backoff: pure decisions.

A :class:`Rule` says, for one event kind, whether it is raised at all, at which severity, to
which channels (by id; the page always shows every alert), and its *repeat interval*. The rules:

- A new event (no alert of its key is open) makes a new alert and is sent at once.
- The same key raised again while its alert is open updates that alert (last seen, count) and is
  sent again only when the repeat interval has passed since it was last sent; an interval of 0
  never repeats. Acknowledging an alert does not resolve it: it stops repeats, because someone
  is on it.
- A resolved alert stays resolved: the same key raised afterwards is a new alert.
- A failed delivery is retried with a growing delay (:data:`RETRY_DELAYS`) and then given up;
  the failure and its reason stay on the alert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from appliance.alerts.events import EVENT_KINDS, check_kind, check_severity
from appliance.errors import InvalidInput

#: Default repeat interval: once a day while the condition holds.
DEFAULT_REPEAT = 24 * 3600
#: Delays before the 2nd, 3rd, ... delivery attempt; after the last one the delivery gives up.
RETRY_DELAYS = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=4),
)


@dataclass(frozen=True)
class Rule:
    kind: str
    enabled: bool
    severity: str
    #: Channel ids; empty: every enabled channel.
    channels: tuple[str, ...] = ()
    repeat_seconds: int = DEFAULT_REPEAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "enabled": self.enabled,
            "severity": self.severity,
            "channels": list(self.channels),
            "repeat_seconds": self.repeat_seconds,
        }


def default_rule(kind: str) -> Rule:
    return Rule(kind, True, EVENT_KINDS[kind].severity)


def parse_rule(kind: str, document: Mapping[str, Any]) -> Rule:
    """A rule from its stored or requested form; :class:`InvalidInput` says what is wrong."""
    check_kind(kind)
    base = default_rule(kind)
    unknown = set(document) - {"kind", "enabled", "severity", "channels", "repeat_seconds"}
    if unknown:
        raise InvalidInput(f"unknown rule field(s): {', '.join(sorted(unknown))}", kind=kind)
    enabled = document.get("enabled", base.enabled)
    if not isinstance(enabled, bool):
        raise InvalidInput("a rule's 'enabled' is true or false", kind=kind)
    severity = check_severity(str(document.get("severity", base.severity)))
    channels = document.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels):
        raise InvalidInput("a rule's channels are a list of channel ids", kind=kind)
    repeat = document.get("repeat_seconds", base.repeat_seconds)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 0:
        raise InvalidInput("a rule's repeat interval is a whole number of seconds, 0 or more")
    return Rule(kind, enabled, severity, tuple(dict.fromkeys(channels)), repeat)


def effective_rules(stored: Mapping[str, Mapping[str, Any]]) -> dict[str, Rule]:
    """A rule for every kind: the stored one, or the kind's default."""
    return {
        kind: parse_rule(kind, stored[kind]) if kind in stored else default_rule(kind)
        for kind in EVENT_KINDS
    }


@dataclass(frozen=True)
class OpenAlert:
    """What suppression needs to know of the open alert of an event's key."""

    last_sent_at: datetime | None
    acknowledged: bool = False


def should_send(rule: Rule, open_alert: OpenAlert | None, now: datetime) -> bool:
    """Whether an event of ``rule``'s kind is sent now (``open_alert``: its key's open alert,
    None when there is none, so the event makes a new one)."""
    if not rule.enabled:
        return False
    if open_alert is None or open_alert.last_sent_at is None:
        return True
    if open_alert.acknowledged or rule.repeat_seconds == 0:
        return False
    return now - open_alert.last_sent_at >= timedelta(seconds=rule.repeat_seconds)


def channels_for(rule: Rule, enabled_channels: Sequence[str]) -> list[str]:
    """The channel ids an event of ``rule`` goes to, among the enabled ones."""
    if not rule.channels:
        return list(enabled_channels)
    return [c for c in rule.channels if c in enabled_channels]


def next_retry(attempts: int, last_attempt: datetime) -> datetime | None:
    """When the next delivery attempt is due after ``attempts`` failed ones; None: give up."""
    if attempts < 1 or attempts > len(RETRY_DELAYS):
        return None
    return last_attempt + RETRY_DELAYS[attempts - 1]
