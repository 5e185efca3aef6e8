"""Event kinds and the event record.

An event says that something is wrong (or, with ``resolved``, no longer wrong) about one
*subject*: an asset, a policy, a pool, a location, a USB disk, a certificate. ``kind`` and
``subject`` together are the event's *key*: the same key raised again while its alert is still
open is a repeat of that alert, not a new one (see :mod:`appliance.alerts.rules`).

Kinds are stable names (the API, the rules and scripts key on them): never rename one. Each has
a default severity; a rule may change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from appliance.catalog.records import JobRecord
from appliance.errors import InvalidInput

CRITICAL = "critical"
WARNING = "warning"
INFO = "info"
#: Most severe first.
SEVERITIES = (CRITICAL, WARNING, INFO)


@dataclass(frozen=True)
class EventKind:
    name: str
    #: What the event is, in words, for the rules page and the summary mail.
    title: str
    severity: str
    #: Raised by the periodic evaluation: an open alert of this kind whose condition no longer
    #: holds is resolved by it. Other kinds are raised one at a time and resolved by hand or by
    #: a later success (a backup that succeeds resolves its asset's ``backup_failed``).
    periodic: bool = False


_KINDS = (
    EventKind("backup_failed", "A backup failed", CRITICAL),
    EventKind("verify_failed", "A verification found damage or failed", CRITICAL),
    EventKind("backup_missed", "A scheduled backup did not run", WARNING, periodic=True),
    EventKind(
        "rpo_missed", "An asset's newest good backup is older than its target", WARNING, True
    ),
    EventKind("copy_leg_lost", "A copy was lost or a location is unavailable", WARNING, True),
    EventKind("boot_test_failed", "A test boot of a virtual machine failed", CRITICAL),
    EventKind("pool_degraded", "A disk pool is degraded or damaged", CRITICAL, periodic=True),
    EventKind("pool_filling", "A disk pool will be full soon", WARNING, periodic=True),
    EventKind("usb_overdue", "A USB disk is overdue in its rotation", WARNING, periodic=True),
    EventKind("certificate_expiring", "A certificate expires soon", WARNING, periodic=True),
    EventKind("credentials_expiring", "Credentials expire soon", WARNING, periodic=True),
    EventKind("ransomware_warning", "A backup looks like ransomware at work", CRITICAL),
    EventKind("test", "A test alert", INFO),
)
EVENT_KINDS: dict[str, EventKind] = {k.name: k for k in _KINDS}


def check_kind(kind: str) -> EventKind:
    found = EVENT_KINDS.get(kind)
    if found is None:
        raise InvalidInput(f"unknown alert kind {kind!r}", kind=kind, allowed=sorted(EVENT_KINDS))
    return found


def check_severity(severity: str) -> str:
    if severity not in SEVERITIES:
        raise InvalidInput(
            f"severity {severity!r} is not one of {', '.join(SEVERITIES)}", value=severity
        )
    return severity


@dataclass(frozen=True)
class AlertEvent:
    """Something that happened or holds at ``at``, about ``subject``."""

    kind: str
    subject: str
    message: str
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)
    #: The condition ended: the open alert of this key is resolved (nothing is sent).
    resolved: bool = False

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if not self.subject:
            raise InvalidInput("an alert event needs a subject")
        if self.at.tzinfo is None:
            raise InvalidInput("an alert event's time must be timezone-aware")

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject}"

    @property
    def default_severity(self) -> str:
        return EVENT_KINDS[self.kind].severity


# --- events raised one at a time ------------------------------------------------------------------

#: Job kinds whose failure is a failed backup, a failed verify, a failed boot test.
BACKUP_JOB_KINDS = frozenset({"backup_files", "backup_image", "policy_backup"})
VERIFY_JOB_KINDS = frozenset({"verify", "verify_copy"})
BOOT_TEST_JOB_KINDS = frozenset({"boot_test"})


def _job_subject(job: JobRecord) -> str:
    if job.kind in VERIFY_JOB_KINDS:
        # A whole-store verify has no point: its subject is the store.
        return str(job.params.get("point") or "store")
    return str(job.params.get("asset") or job.params.get("policy") or job.kind)


def _damage(job: JobRecord) -> dict[str, Any]:
    affected = (job.result or {}).get("affected_points") if job.kind in VERIFY_JOB_KINDS else None
    return dict(affected) if isinstance(affected, dict) else {}


def job_event(job: JobRecord, at: datetime) -> AlertEvent | None:
    """The event an ended job raises: a failure of a backup, verify or boot test, or (a success
    of one) the all-clear of that kind for its subject; None for other jobs and states."""
    if job.kind in BACKUP_JOB_KINDS:
        kind, what = "backup_failed", "backup"
    elif job.kind in VERIFY_JOB_KINDS:
        kind, what = "verify_failed", "verification"
    elif job.kind in BOOT_TEST_JOB_KINDS:
        kind, what = "boot_test_failed", "test boot"
    else:
        return None
    subject = _job_subject(job)
    damaged = _damage(job)
    if job.state == "succeeded" and damaged:
        points = ", ".join(sorted(damaged)[:10])
        return AlertEvent(
            kind,
            subject,
            f"The verification found damage in {len(damaged)} "
            + ("backup" if len(damaged) == 1 else "backups")
            + f": {points}.",
            at,
            details={"job": job.id, "job_kind": job.kind, "points": sorted(damaged)},
        )
    if job.state == "succeeded":
        return AlertEvent(kind, subject, f"The {what} of {subject} succeeded.", at, resolved=True)
    if job.state != "failed":
        return None
    error = job.error or {}
    reason = str(error.get("message") or "no reason was recorded")
    details = {"job": job.id, "job_kind": job.kind, "error_code": error.get("code")}
    return AlertEvent(
        kind, subject, f"The {what} of {subject} failed: {reason}", at, details=details
    )


def ransomware_warning(asset: str, point_id: str, reason: str, at: datetime) -> AlertEvent:
    """A backup of ``asset`` (point ``point_id``) looks like files were encrypted: ``reason``."""
    return AlertEvent(
        "ransomware_warning",
        asset,
        f"The backup {point_id} of {asset} looks like ransomware at work: {reason}. "
        "Its older backups are kept until someone looks.",
        at,
        details={"point": point_id, "reason": reason},
    )


def suspicion_event(job: JobRecord, at: datetime) -> AlertEvent | None:
    """The ransomware warning a finished backup job carries: its result names the point's
    ``suspicion`` (the verdict's reasons, :mod:`appliance.ransomware`); None when it has none."""
    result = job.result or {}
    reasons = result.get("suspicion") if job.state == "succeeded" else None
    if not reasons or not result.get("point"):
        return None
    asset = str(result.get("asset") or job.params.get("asset") or "")
    return ransomware_warning(asset, str(result["point"]), "; ".join(map(str, reasons)), at)


def test_alert(by: str, at: datetime) -> AlertEvent:
    return AlertEvent(
        "test",
        "test",
        f"This is a test alert sent by {by}. If you can read it, alerts reach you.",
        at,
        details={"by": by},
    )
