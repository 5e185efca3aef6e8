"""Alerts delivered for real: an aiosmtpd server on 127.0.0.1 (STARTTLS required, AUTH LOGIN)
and an http.server webhook receiver, fed by a live service: a backup that fails, a missed
schedule and an RPO miss found by the periodic evaluation at injected times, a wrong SMTP
password, repeat suppression, acknowledge and its audit entry."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import re
import shutil
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from api_support import LiveServer, bootstrapped_server, free_port, wait_job
from test_signals import encrypt, make_office, normal_day

from api.alert_channels import secrets_path
from api.alerting import SUMMARY_KEY
from api.tls import ensure_certificate
from appliance.catalog.records import PolicyRecord

SMTP_USER, SMTP_PASSWORD = "alert", "s3cret-mail"
HMAC_KEY = "hook-signing-key"


@dataclass
class Mailbox:
    messages: list[tuple[bool, str, list[str], str]] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.content.decode(errors="replace")
        self.messages.append(
            (bool(session.authenticated), envelope.mail_from, list(envelope.rcpt_tos), content)
        )
        return "250 OK"

    def authenticator(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == SMTP_USER.encode()
            and auth_data.password == SMTP_PASSWORD.encode()
        )
        self.logins.append((mechanism, ok))
        # handled=False: the server answers the client itself (True would leave it hanging).
        return AuthResult(success=ok, handled=False)


@dataclass
class Smtp:
    port: int
    ca_file: Path
    mailbox: Mailbox


@pytest.fixture(scope="module")
def smtp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smtp]:
    root = tmp_path_factory.mktemp("smtp")
    cert, key = root / "cert.pem", root / "key.pem"
    ensure_certificate(cert, key, "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=mailbox.authenticator,
        auth_require_tls=True,
        auth_exclude_mechanism=["PLAIN"],
    )
    controller.start()
    try:
        yield Smtp(port, cert, mailbox)
    finally:
        controller.stop()


@dataclass
class Hooks:
    url: str
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    received: list[tuple[str, dict[str, str], bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Hooks(f"http://127.0.0.1:{server.server_address[1]}", received)
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("alerts-service")) as live:
        yield live


def eventually(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def email_channel(admin: httpx.Client, smtp: Smtp, name: str, password: str) -> dict[str, Any]:
    r = admin.post(
        "/api/alert-channels",
        json={
            "name": name,
            "kind": "email",
            "enabled": name == "mail",
            "email": {
                "host": "127.0.0.1",
                "port": smtp.port,
                "username": SMTP_USER,
                "sender": "appliance@example.test",
                "recipients": ["owner@example.test"],
                "ca_file": str(smtp.ca_file),
            },
            "password": password,
        },
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def channels(
    server: LiveServer, admin: httpx.Client, smtp: Smtp, hooks: Hooks
) -> dict[str, dict[str, Any]]:
    mail = email_channel(admin, smtp, "mail", SMTP_PASSWORD)
    wrong = email_channel(admin, smtp, "mail-wrong-password", "not-the-password")
    r = admin.post(
        "/api/alert-channels",
        json={
            "name": "hook",
            "kind": "webhook",
            "webhook": {"preset": "generic"},
            "url": f"{hooks.url}/hook/secret-token",
            "hmac_key": HMAC_KEY,
        },
    )
    assert r.status_code == 201, r.text
    return {"mail": mail, "wrong": wrong, "hook": r.json()}


def alerts_of(client: httpx.Client, kind: str, **query: str) -> list[dict[str, Any]]:
    r = client.get("/api/alerts", params=query)
    assert r.status_code == 200, r.text
    return [a for a in r.json() if a["kind"] == kind]


# --- channels --------------------------------------------------------------------------------------


def test_channel_secrets_are_kept_apart_and_never_shown(
    server: LiveServer, admin: httpx.Client, channels: dict[str, dict[str, Any]]
) -> None:
    hook = channels["hook"]
    assert hook["secrets_set"] == ["hmac_key", "url"] and hook["url_host"] == "127.0.0.1"
    listed = admin.get("/api/alert-channels")
    assert listed.status_code == 200
    assert "secret-token" not in listed.text and SMTP_PASSWORD not in listed.text
    path = secrets_path(server.settings.secrets_dir, hook["id"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "secret-token" in path.read_text()
    audit = admin.get("/api/audit").text
    assert "secret-token" not in audit and SMTP_PASSWORD not in audit


def test_bad_channel_input_is_refused_with_a_reason(
    admin: httpx.Client, operator: httpx.Client, channels: dict[str, Any]
) -> None:
    bad_url = admin.post(
        "/api/alert-channels",
        json={"name": "x", "kind": "webhook", "webhook": {}, "url": "file:///etc/shadow"},
    )
    assert bad_url.status_code == 400 and "http://" in bad_url.json()["message"]
    bad_ca = admin.post(
        "/api/alert-channels",
        json={
            "name": "y",
            "kind": "email",
            "email": {
                "host": "127.0.0.1",
                "sender": "a@b.test",
                "recipients": ["c@d.test"],
                "ca_file": "/etc/hostname",
            },
        },
    )
    assert bad_ca.status_code == 400 and "no PEM certificate" in bad_ca.json()["message"]
    assert operator.get("/api/alert-channels").status_code == 403


def test_test_alert_reaches_the_mailbox_and_a_wrong_password_says_so(
    admin: httpx.Client, smtp: Smtp, channels: dict[str, dict[str, Any]]
) -> None:
    before = len(smtp.mailbox.messages)
    ok = admin.post(f"/api/alert-channels/{channels['mail']['id']}/test")
    assert ok.status_code == 200, ok.text
    assert ok.json()["ok"] is True and ok.json()["error"] is None
    authenticated, sender, recipients, content = smtp.mailbox.messages[before]
    assert authenticated and sender == "appliance@example.test"
    assert recipients == ["owner@example.test"] and "This is a test alert" in content
    wrong = admin.post(f"/api/alert-channels/{channels['wrong']['id']}/test").json()
    assert wrong["ok"] is False
    assert wrong["error"].startswith("SMTP server refused the login")
    assert ("LOGIN", False) in smtp.mailbox.logins
    assert len(smtp.mailbox.messages) == before + 1  # nothing sent with the wrong login


def test_a_failed_backup_reaches_the_mailbox_and_the_webhook_once(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    smtp: Smtp,
    hooks: Hooks,
    channels: dict[str, Any],
    tmp_path: Path,
) -> None:
    source = tmp_path / "docs"
    source.mkdir()
    (source / "a.txt").write_text("hello")
    r = admin.post("/api/assets", json={"name": "docs", "kind": "files", "path": str(source)})
    assert r.status_code == 201, r.text
    shutil.rmtree(source)  # the share went away: the backup fails
    mails, posts = len(smtp.mailbox.messages), len(hooks.received)
    job = wait_job(operator, operator.post("/api/assets/docs/backup", json={}).json()["id"])
    assert job["state"] == "failed"
    alert = eventually(lambda: alerts_of(operator, "backup_failed"))[0]
    assert alert["subject"] == "docs" and alert["severity"] == "critical"
    delivered = eventually(
        lambda: len(smtp.mailbox.messages) > mails and len(hooks.received) > posts
    )
    assert delivered
    content = smtp.mailbox.messages[mails][3]
    assert "The backup of docs failed" in content and "[CRITICAL]" in content
    path, headers, body = hooks.received[posts]
    assert path == "/hook/secret-token"
    document = json.loads(body)
    assert document["kind"] == "backup_failed" and document["subject"] == "docs"
    expected = "sha256=" + hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Appliance-Signature"] == expected
    states = eventually(
        lambda: (
            {d["channel"]: d["state"] for d in alerts_of(operator, "backup_failed")[0]["delivery"]}
            if len(alerts_of(operator, "backup_failed")[0]["delivery"]) == 2
            else None
        )
    )
    assert states == {"mail": "sent", "hook": "sent"}

    # The same failure again, within the repeat interval: one alert, counted, not sent again.
    job = wait_job(operator, operator.post("/api/assets/docs/backup", json={}).json()["id"])
    assert job["state"] == "failed"
    again = eventually(lambda: [a for a in alerts_of(operator, "backup_failed") if a["count"] == 2])
    assert len(alerts_of(operator, "backup_failed")) == 1 and again[0]["id"] == alert["id"]
    time.sleep(0.5)
    assert len(smtp.mailbox.messages) == mails + 1 and len(hooks.received) == posts + 1


def test_a_simulated_ransomware_run_reaches_the_mailbox_and_the_webhook(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    smtp: Smtp,
    hooks: Hooks,
    channels: dict[str, Any],
    tmp_path: Path,
) -> None:
    source = tmp_path / "office"
    make_office(source)
    r = admin.post("/api/assets", json={"name": "office", "kind": "files", "path": str(source)})
    assert r.status_code == 201, r.text

    def backup() -> dict[str, Any]:
        job = wait_job(operator, operator.post("/api/assets/office/backup", json={}).json()["id"])
        assert job["state"] == "succeeded", job
        return dict(job["result"])

    for day in range(4):  # a first backup, then ordinary days: no warning
        if day:
            normal_day(source, day)
        assert not backup().get("suspicion")
    assert alerts_of(operator, "ransomware_warning") == []
    mails, posts = len(smtp.mailbox.messages), len(hooks.received)
    encrypted = encrypt(source)
    result = backup()
    assert result["suspicion"], result
    alert = eventually(lambda: alerts_of(operator, "ransomware_warning"))[0]
    assert alert["subject"] == "office" and alert["severity"] == "critical"
    assert alert["details"]["point"] == result["point"]
    assert eventually(lambda: len(smtp.mailbox.messages) > mails and len(hooks.received) > posts)
    content = smtp.mailbox.messages[mails][3]
    assert "looks like ransomware" in content and f"{encrypted} files gained" in content
    document = json.loads(hooks.received[posts][2])
    assert document["kind"] == "ransomware_warning" and document["subject"] == "office"


def test_acknowledge_needs_an_operator_and_is_audited(
    admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client, channels: dict[str, Any]
) -> None:
    alert = eventually(lambda: alerts_of(viewer, "backup_failed", state="open"))[0]
    counts = viewer.get("/api/alerts/counts").json()
    assert counts["critical"] >= 1 and counts["total"] >= counts["critical"]
    assert viewer.post(f"/api/alerts/{alert['id']}/acknowledge").status_code == 403
    r = operator.post(f"/api/alerts/{alert['id']}/acknowledge")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "acknowledged" and r.json()["acknowledged_by"] == "operator"
    assert [a["id"] for a in alerts_of(viewer, "backup_failed", state="acknowledged")] == [
        alert["id"]
    ]
    assert viewer.get("/api/alerts/counts").json()["critical"] == counts["critical"] - 1
    entries = admin.get("/api/audit").json()
    assert any(
        e["action"] == "alert.acknowledge"
        and e["actor"] == "operator"
        and e["target"] == str(alert["id"])
        for e in entries
    )
    assert operator.post("/api/alerts/999999/acknowledge").status_code == 404
    assert viewer.post(f"/api/alerts/{alert['id']}/resolve").status_code == 403
    resolved = operator.post(f"/api/alerts/{alert['id']}/resolve")
    assert resolved.status_code == 200 and resolved.json()["state"] == "resolved"
    assert not alerts_of(viewer, "backup_failed", state="acknowledged")
    assert any(e["action"] == "alert.resolve" for e in admin.get("/api/audit").json())


def test_a_missed_schedule_and_an_rpo_miss_are_raised_by_the_evaluation(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    smtp: Smtp,
    hooks: Hooks,
    channels: dict[str, Any],
    tmp_path: Path,
) -> None:
    source = tmp_path / "mail"
    source.mkdir()
    (source / "inbox.mbox").write_text("From: a\n\nhi\n")
    r = admin.post("/api/assets", json={"name": "mail", "kind": "files", "path": str(source)})
    assert r.status_code == 201, r.text
    job = wait_job(operator, operator.post("/api/assets/mail/backup", json={}).json()["id"])
    assert job["state"] == "succeeded"
    service = server.service
    catalog = service.app.catalog
    # The ticks below run hours ahead of the wall clock: whether they cross the daily summary's
    # hour depends on when the suite runs, so the summary (tested on its own) is off here.
    catalog.put_settings(SUMMARY_KEY, {"frequency": "off"})
    catalog.add_policy(
        PolicyRecord(
            name="mail-hourly",
            assets=["mail"],
            schedule={"entries": [{"cron": "0 * * * *", "mode": "incremental"}]},
            mode="incremental",
            retention={},
            rpo_seconds=3600,
        )
    )
    now = service.now()
    # The scheduler sees the policy once (its state starts now), then stops ticking.
    service.scheduler.paused = False
    service.scheduler.tick(now)
    service.scheduler.paused = True
    assert not alerts_of(operator, "backup_missed") and not alerts_of(operator, "rpo_missed")
    mails, posts = len(smtp.mailbox.messages), len(hooks.received)
    later = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2, minutes=35)
    events = service.alerts.evaluate(later)
    assert {"backup_missed", "rpo_missed"} <= {e.kind for e in events}
    missed = alerts_of(operator, "backup_missed")
    assert [a["subject"] for a in missed] == ["mail-hourly"]
    assert "did not run" in missed[0]["message"]
    rpo = alerts_of(operator, "rpo_missed")
    assert [a["subject"] for a in rpo] == ["mail"] and "the target is at most 1 hour" in rpo[0][
        "message"
    ]
    contents = [m[3] for m in smtp.mailbox.messages[mails:]]
    assert any("did not run" in c for c in contents)
    assert any("newest good backup of mail" in c for c in contents)
    # The webhook got both too, as JSON naming the event and its subject.
    posted = eventually(
        lambda: (
            {
                (d["kind"], d["subject"])
                for d in (json.loads(b) for _, _, b in hooks.received[posts:])
            }
            if len(hooks.received) >= posts + 2
            else None
        )
    )
    assert {("backup_missed", "mail-hourly"), ("rpo_missed", "mail")} <= posted

    # Evaluated again a minute later: nothing new is sent (repeats suppressed).
    sent = len(smtp.mailbox.messages)
    hooked = len(hooks.received)
    service.alerts.evaluate(later + timedelta(minutes=1))
    assert len(smtp.mailbox.messages) == sent
    assert alerts_of(operator, "backup_missed")[0]["count"] == 2
    # The scheduler's ticks evaluate at most every 5 minutes.
    service.alerts.tick(later + timedelta(minutes=2))
    assert alerts_of(operator, "backup_missed")[0]["count"] == 3
    service.alerts.tick(later + timedelta(minutes=3))
    assert alerts_of(operator, "backup_missed")[0]["count"] == 3
    service.alerts.tick(later + timedelta(minutes=8))
    assert alerts_of(operator, "backup_missed")[0]["count"] == 4
    assert len(smtp.mailbox.messages) == sent and len(hooks.received) == hooked

    # A backup runs: the next evaluation resolves both.
    job = wait_job(operator, operator.post("/api/assets/mail/backup", json={}).json()["id"])
    assert job["state"] == "succeeded"
    catalog.delete_policy("mail-hourly")
    service.alerts.evaluate(service.now())
    assert alerts_of(operator, "rpo_missed", state="resolved")
    assert alerts_of(operator, "backup_missed", state="resolved")
    assert not alerts_of(operator, "backup_missed", state="open")


def test_a_failed_delivery_is_recorded_and_retried_with_backoff(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, channels: dict[str, Any]
) -> None:
    wrong = channels["wrong"]["id"]
    r = admin.patch(f"/api/alert-channels/{wrong}", json={"enabled": True})
    assert r.status_code == 200 and r.json()["enabled"] is True
    rules = admin.put(
        "/api/alert-rules",
        json=[
            {
                "kind": "usb_overdue",
                "enabled": True,
                "severity": "critical",
                "channels": [wrong],
                "repeat_seconds": 0,
            }
        ],
    )
    assert rules.status_code == 200, rules.text
    rule = next(x for x in rules.json() if x["kind"] == "usb_overdue")
    assert rule["severity"] == "critical" and rule["channels"] == [wrong]
    from appliance.alerts.evaluate import OverdueMedium, usb_overdue

    service = server.service
    now = service.now()
    service.alerts.emit(usb_overdue([OverdueMedium("weekly", "USB-A", 4)], now)[0])
    alert = alerts_of(operator, "usb_overdue")[0]
    assert alert["severity"] == "critical"
    (delivery,) = alert["delivery"]
    assert delivery["state"] == "failed" and delivery["attempts"] == 1
    assert delivery["error"].startswith("SMTP server refused the login")
    first_retry = delivery["next_retry"]
    assert service.alerts.retry_failed(now) == 0  # not due yet
    assert service.alerts.retry_failed(now + timedelta(minutes=2)) == 1
    (delivery,) = alerts_of(operator, "usb_overdue")[0]["delivery"]
    assert delivery["attempts"] == 2 and delivery["next_retry"] > first_retry
    admin.patch(f"/api/alert-channels/{wrong}", json={"enabled": False})
    assert (
        admin.put(
            "/api/alert-rules",
            json=[{"kind": "nope", "enabled": True, "severity": "info", "repeat_seconds": 0}],
        ).status_code
        == 400
    )


def test_the_summary_mail_lists_what_needs_attention_once_a_day(
    server: LiveServer, admin: httpx.Client, smtp: Smtp, channels: dict[str, Any]
) -> None:
    from appliance.alerts.events import AlertEvent

    r = admin.put("/api/alert-summary", json={"frequency": "daily", "hour": 0})
    assert r.status_code == 200 and r.json() == {"frequency": "daily", "hour": 0}
    service = server.service
    now = service.now()
    service.alerts.emit(
        AlertEvent("pool_filling", "big", "Disk pool big will be full in about 9 days.", now)
    )
    before = len(smtp.mailbox.messages)
    # A day on: earlier tests' ticks at later times may have sent today's summary already.
    tomorrow = now + timedelta(days=1)
    assert service.alerts.summary(tomorrow) is True
    assert len(smtp.mailbox.messages) == before + 1
    content = smtp.mailbox.messages[-1][3]
    assert re.search(r"Subject: .*: (1 alert needs|\d+ alerts need) attention", content)
    assert "Disk pool big will be full in about 9 days." in content
    assert service.alerts.summary(tomorrow + timedelta(minutes=1)) is False  # once a day
    assert (
        admin.put("/api/alert-summary", json={"frequency": "hourly", "hour": 0}).status_code == 422
    )


def test_the_appliance_certificate_is_raised_before_it_expires(
    server: LiveServer, operator: httpx.Client, tmp_path: Path
) -> None:
    from api.alerting import certificate_expiry

    cert = tmp_path / "cert.pem"
    ensure_certificate(cert, tmp_path / "key.pem", "127.0.0.1")
    expires = certificate_expiry(cert.read_bytes())
    service = server.service
    service.alerts.certificate = cert
    try:
        early = service.alerts.evaluate(expires - timedelta(days=40))
        assert "certificate_expiring" not in {e.kind for e in early}
        service.alerts.evaluate(expires - timedelta(days=10))
        (alert,) = alerts_of(operator, "certificate_expiring", state="open")
        assert alert["subject"] == "appliance"
        assert alert["message"].startswith("The appliance's TLS certificate expires on")
    finally:
        service.alerts.certificate = None
