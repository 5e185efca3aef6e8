"""The alert service: raises events as alerts, applies the rules and delivers them.

One :class:`AlertService` per running service. Sources:

- :meth:`AlertService.emit` -- any event (a job's end, a ransomware warning, a test alert). It
  stores or updates the alert (``Catalog.raise_alert``), decides with the event kind's rule
  whether to send (``appliance.alerts.rules.should_send``: repeats are suppressed within the
  rule's interval) and sends to the rule's channels. A resolving event resolves the open alert.
- :meth:`AlertService.job_ended` -- registered with the job runner: a failed backup, verify or
  boot test raises its event; a successful one resolves it. Sending happens on a thread of its
  own: a slow or broken mail server never holds a job's resources or fails it.
- :meth:`AlertService.tick` -- called in every scheduler tick: evaluates the periodic conditions
  (``appliance.alerts.evaluate``: missed schedules, RPO, lost copies, pools, USB rotation,
  certificates, API tokens with an expiry) and resolves what no longer holds, retries failed deliveries whose backoff has
  passed, and sends the summary mail when it is due.

Nothing here raises to its caller: a failure to alert is logged and recorded on the alert.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from cryptography import x509

from api.alert_channels import DeliveryFailed, deliver, load_secrets, send_text
from appliance.alerts.evaluate import (
    EXPIRY_WARNING,
    Expiring,
    OverdueMedium,
    PoolSnapshot,
    copy_legs_lost,
    expiring,
    missed_backups,
    pool_events,
    rpo_misses,
    to_resolve,
    usb_overdue,
)
from appliance.alerts.events import (
    EVENT_KINDS,
    AlertEvent,
    job_event,
    suspicion_event,
    test_alert,
)
from appliance.alerts.records import AlertChannelRecord, AlertRecord
from appliance.alerts.rules import (
    OpenAlert,
    Rule,
    channels_for,
    effective_rules,
    next_retry,
    should_send,
)
from appliance.alerts.summary import parse_summary, summary_due, summary_text
from appliance.catalog import Catalog
from appliance.catalog.records import JobRecord, TokenRecord
from appliance.engine import Appliance

log = logging.getLogger("appliance.alerts")

Clock = Callable[[], datetime]
SUMMARY_KEY = "alert_summary"
#: Catalog setting holding when the last summary went out.
SUMMARY_SENT_KEY = "alert_summary_sent"
#: The periodic evaluation reads every policy, point and location: the scheduler ticks every 30 s,
#: but conditions measured in hours need not be checked that often.
EVALUATE_INTERVAL = timedelta(minutes=5)


def pools_snapshot(app: Appliance, now: datetime) -> list[PoolSnapshot]:
    from hardware.pool_backend import list_pool_status

    return [
        PoolSnapshot(s.pool.name, s.health.state, tuple(s.health.reasons), s.days_until_full)
        for s in list_pool_status(app, now)
    ]


def usb_snapshot(app: Appliance, now: datetime) -> list[OverdueMedium]:
    from hardware.usb import rotation_overview

    return [
        OverdueMedium(str(r["name"]), str(m["label"]), int(m["overdue_days"]))
        for r in rotation_overview(app, now)
        for m in r["status"]["media"]
        if m.get("overdue_days")
    ]


def certificate_expiry(pem: bytes) -> datetime:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


def token_subject(token_id: str) -> str:
    """The subject of a token's ``credentials_expiring`` alert."""
    return f"token:{token_id}"


def expiring_tokens(tokens: list[TokenRecord]) -> list[Expiring]:
    """The unrevoked tokens that carry an expiry, as :class:`Expiring` items. An expired one
    stays until it is revoked: scripts using it have stopped working."""
    return [
        Expiring(
            token_subject(t.id),
            f"The API token {t.id[:8]} of {t.user} ({t.scopes[0] if t.scopes else 'viewer'})",
            t.expires_at,
        )
        for t in tokens
        if t.expires_at is not None and t.revoked_at is None
    ]


def settle_token_alert(catalog: Catalog, token: TokenRecord, now: datetime) -> None:
    """Resolve a token's ``credentials_expiring`` alert at once when it no longer holds: the
    token was revoked, or renewed beyond the warning window (or to never). A renewal still
    inside the window leaves the alert to the periodic evaluation (it still holds)."""
    if (
        token.revoked_at is not None
        or token.expires_at is None
        or token.expires_at - now > EXPIRY_WARNING
    ):
        catalog.resolve_alerts("credentials_expiring", token_subject(token.id), now)


class AlertService:
    def __init__(
        self,
        app: Appliance,
        secrets_dir: Path,
        *,
        clock: Clock,
        appliance_name: Callable[[], str],
        tz: Callable[[], tzinfo],
        certificate: Path | None = None,
        hardware: bool = True,
    ) -> None:
        """``certificate``: the appliance's own TLS certificate (None: TLS is off).
        ``hardware``: evaluate pools and USB rotation (off in tests without disks)."""
        self.app = app
        self.secrets_dir = secrets_dir
        self.clock = clock
        self.appliance_name = appliance_name
        self.tz = tz
        self.certificate = certificate
        self.hardware = hardware
        self._lock = threading.Lock()
        self._evaluated_at: datetime | None = None

    @property
    def catalog(self) -> Catalog:
        return self.app.catalog

    def rules(self) -> dict[str, Rule]:
        return effective_rules(self.catalog.alert_rules())

    def channel_secrets(self, channel_id: str) -> dict[str, str]:
        return load_secrets(self.secrets_dir, channel_id)

    # --- raising ----------------------------------------------------------------------------------

    def emit(self, event: AlertEvent) -> AlertRecord | None:
        """Record ``event`` and send it if its rule says so; the alert, or None when the rule
        is off or the event resolved an alert. Never raises."""
        try:
            return self._emit(event)
        except Exception:
            log.exception("alert %s could not be raised", event.key)
            return None

    def _emit(self, event: AlertEvent) -> AlertRecord | None:
        if event.resolved:
            self.catalog.resolve_alerts(event.kind, event.subject, event.at)
            return None
        rule = self.rules()[event.kind]
        if not rule.enabled:
            return None
        with self._lock:  # find-then-raise: one emitter decides a key's sending at a time
            previous = self.catalog.find_open_alert(event.kind, event.subject)
            alert, _new = self.catalog.raise_alert(event, rule.severity)
            now = self.clock()
            open_alert = (
                OpenAlert(previous.last_sent_at, previous.acknowledged_at is not None)
                if previous is not None
                else None
            )
            if not should_send(rule, open_alert, now):
                return alert
        return self._send(alert, rule, now, reset=True)

    def job_ended(self, job: JobRecord) -> None:
        """The job runner's listener: raise (or resolve) the job's event on a thread."""
        at = job.finished_at or self.clock()
        # A backup runs in a child process: its suspicion comes back in its result.
        for event in (job_event(job, at), suspicion_event(job, at)):
            if event is not None:
                threading.Thread(target=self.emit, args=(event,), name="alert", daemon=True).start()

    def ransomware(self, event: AlertEvent) -> AlertRecord | None:
        return self.emit(event)

    # --- sending ----------------------------------------------------------------------------------

    def _enabled_channels(self) -> dict[str, AlertChannelRecord]:
        return {c.id: c for c in self.catalog.list_alert_channels() if c.enabled}

    def _send(self, alert: AlertRecord, rule: Rule, now: datetime, *, reset: bool) -> AlertRecord:
        channels = self._enabled_channels()
        for channel_id in channels_for(rule, list(channels)):
            previous = alert.delivery.get(channel_id, {})
            attempts = 1 if reset else int(previous.get("attempts", 0)) + 1
            alert = self._attempt(alert, channels[channel_id], attempts, now)
        return alert

    def _attempt(
        self, alert: AlertRecord, channel: AlertChannelRecord, attempts: int, now: datetime
    ) -> AlertRecord:
        outcome: dict[str, Any] = {
            "attempts": attempts,
            "at": now.isoformat(),
            "channel": channel.name,
        }
        try:
            deliver(channel, self.channel_secrets(channel.id), alert, self.appliance_name())
        except DeliveryFailed as exc:
            retry = next_retry(attempts, now)
            outcome |= {
                "state": "failed" if retry else "given_up",
                "error": exc.message,
                "next_retry": retry.isoformat() if retry else None,
            }
            log.warning("alert %s not delivered to %s: %s", alert.id, channel.name, exc.message)
            return self.catalog.record_delivery(alert.id, channel.id, outcome, sent_at=None)
        except Exception as exc:  # a bug in a channel must not lose the alert
            log.exception("alert %s: channel %s failed", alert.id, channel.name)
            outcome |= {"state": "given_up", "error": f"internal error: {exc}", "next_retry": None}
            return self.catalog.record_delivery(alert.id, channel.id, outcome, sent_at=None)
        outcome |= {"state": "sent", "error": None, "next_retry": None}
        return self.catalog.record_delivery(alert.id, channel.id, outcome, sent_at=now)

    def send_test(self, channel_id: str, by: str) -> dict[str, Any]:
        """Send a test alert to one channel now (even a disabled one); the outcome, with the
        exact failure when it failed."""
        channel = self.catalog.get_alert_channel(channel_id)
        now = self.clock()
        alert, _new = self.catalog.raise_alert(test_alert(by, now), "info")
        alert = self._attempt(alert, channel, 1, now)
        # A test proves the path, not a condition: it is resolved at once.
        self.catalog.resolve_alerts("test", "test", now)
        outcome = dict(alert.delivery[channel.id])
        return {"ok": outcome["state"] == "sent", "error": outcome.get("error"), "alert": alert.id}

    def retry_failed(self, now: datetime) -> int:
        """Try again every failed delivery whose backoff has passed; how many were tried."""
        tried = 0
        channels = self._enabled_channels()
        for alert in self.catalog.unresolved_alerts():
            for channel_id, outcome in alert.delivery.items():
                due = outcome.get("next_retry")
                if outcome.get("state") != "failed" or not due or channel_id not in channels:
                    continue
                if datetime.fromisoformat(due) > now:
                    continue
                attempts = int(outcome.get("attempts", 1)) + 1
                alert = self._attempt(alert, channels[channel_id], attempts, now)
                tried += 1
        return tried

    # --- the periodic evaluation --------------------------------------------------------------------

    def evaluate(self, now: datetime) -> list[AlertEvent]:
        """Raise what holds now and resolve what no longer does; returns the events raised."""
        catalog = self.catalog
        events: list[AlertEvent] = []
        evaluated: set[str] = set()

        def run(kinds: tuple[str, ...], produce: Callable[[], list[AlertEvent]]) -> None:
            try:
                events.extend(produce())
                evaluated.update(kinds)
            except Exception:  # one failing source must not hide the others
                log.exception("alert evaluation of %s failed", ", ".join(kinds))

        policies = catalog.list_policies()
        run(
            ("backup_missed",),
            lambda: missed_backups(
                policies,
                catalog.schedule_state(),
                catalog.list_jobs(limit=1000),
                now,
                tz=self.tz(),
            ),
        )
        run(("rpo_missed",), lambda: rpo_misses(policies, catalog.list_points(), now))
        run(("copy_leg_lost",), lambda: self._copy_legs(now))
        if self.hardware:
            run(
                ("pool_degraded", "pool_filling"),
                lambda: pool_events(pools_snapshot(self.app, now), now),
            )
            run(("usb_overdue",), lambda: usb_overdue(usb_snapshot(self.app, now), now))
        run(("certificate_expiring",), lambda: self._certificates(now))
        run(
            ("credentials_expiring",),
            lambda: expiring("credentials_expiring", expiring_tokens(catalog.list_tokens()), now),
        )
        for event in events:
            self.emit(event)
        open_keys = catalog.open_alert_keys(evaluated)
        for kind, subject in to_resolve(open_keys, events, evaluated):
            catalog.resolve_alerts(kind, subject, now)
        return events

    def _copy_legs(self, now: datetime) -> list[AlertEvent]:
        locations = self.catalog.list_locations()
        lost = [c for loc in locations for c in self.catalog.copies_at(loc.id, state="lost")]
        return copy_legs_lost(locations, lost, now)

    def _certificates(self, now: datetime) -> list[AlertEvent]:
        items = []
        if self.certificate is not None and self.certificate.is_file():
            expires = certificate_expiry(self.certificate.read_bytes())
            items.append(Expiring("appliance", "The appliance's TLS certificate", expires))
        for location in self.catalog.list_locations():
            pem = location.details.get("cert_pem")
            if location.kind == "peer" and isinstance(pem, str):
                name = location.label or location.address
                expires = certificate_expiry(pem.encode())
                items.append(Expiring(f"peer:{location.id}", f"The certificate of {name}", expires))
        return expiring("certificate_expiring", items, now)

    def summary(self, now: datetime) -> bool:
        """Send the summary mail to the e-mail channels when it is due; whether it was sent."""
        catalog = self.catalog
        settings = parse_summary(catalog.get_settings(SUMMARY_KEY))
        sent = catalog.get_settings(SUMMARY_SENT_KEY).get("at")
        last_sent = datetime.fromisoformat(sent) if isinstance(sent, str) else None
        recent = catalog.list_alerts(limit=500)
        alerts = [a for a in recent if a.kind != "test"]
        if not summary_due(settings, last_sent, alerts, now, self.tz()):
            return False
        email = [c for c in self._enabled_channels().values() if c.kind == "email"]
        if not email:
            return False
        title, body = summary_text(alerts, last_sent, self.appliance_name())
        carrier = AlertRecord(0, "test", "summary", "info", body, {}, now, now, 1)
        for channel in email:
            try:
                send_text(channel, self.channel_secrets(channel.id), carrier, title)
            except DeliveryFailed as exc:
                log.warning("summary not delivered to %s: %s", channel.name, exc.message)
        catalog.put_settings(SUMMARY_SENT_KEY, {"at": now.isoformat()})
        return True

    def tick(self, now: datetime) -> list[str]:
        """The scheduler's periodic call (it submits no job: returns no job IDs). The evaluation
        runs at most every :data:`EVALUATE_INTERVAL` (and again when the clock went back)."""
        last = self._evaluated_at
        steps: list[Callable[[datetime], object]] = [self.retry_failed, self.summary]
        if last is None or now < last or now - last >= EVALUATE_INTERVAL:
            self._evaluated_at = now
            steps.insert(0, self.evaluate)
        for step in steps:
            try:
                step(now)
            except Exception:
                log.exception("alert tick step %s failed", getattr(step, "__name__", step))
        return []


def kinds_document() -> list[dict[str, Any]]:
    return [
        {"kind": k.name, "title": k.title, "severity": k.severity, "periodic": k.periodic}
        for k in EVENT_KINDS.values()
    ]
