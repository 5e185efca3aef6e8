"""Every webhook preset posted for real to an ``http.server`` receiver on 127.0.0.1: the body each
receiver kind expects (ntfy's publish JSON at the server's root, Gotify's message, a Slack-style
``text``, a Teams MessageCard, the generic alert), its severity mapped to the receiver's
priority or colour, and the HMAC signature over the exact bytes sent."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from api.alert_channels import PRESETS, compose, send_webhook
from appliance.alerts.records import AlertRecord

T0 = datetime(2026, 12, 5, 21, 0, tzinfo=UTC)
ALERT = AlertRecord(
    id=7,
    kind="backup_failed",
    subject="docs",
    severity="critical",
    message="The backup of docs failed: the folder /srv/docs does not exist",
    details={"job": "j1"},
    first_seen=T0,
    last_seen=T0,
    count=1,
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, str], bytes]]]]:
    received: list[tuple[str, dict[str, str], bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, dict(self.headers.items()), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", received
    finally:
        httpd.shutdown()
        thread.join(10)


def post(
    receiver: tuple[str, list[tuple[str, dict[str, str], bytes]]], preset: str, path: str
) -> tuple[str, dict[str, str], dict[str, Any]]:
    url, received = receiver
    before = len(received)
    secrets = {"url": url + path, "hmac_key": "k"}
    send_webhook({"preset": preset, "timeout": 5}, secrets, ALERT, compose(ALERT, "box"))
    assert len(received) == before + 1
    got_path, headers, body = received[-1]
    expected = "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert headers["X-Appliance-Signature"] == expected
    assert headers["Content-Type"] == "application/json"
    return got_path, headers, json.loads(body)


def test_every_preset_is_covered_here() -> None:
    assert set(PRESETS) == {"generic", "ntfy", "gotify", "slack", "teams"}


def test_ntfy_posts_to_the_server_root_with_the_topic(receiver: Any) -> None:
    path, _, body = post(receiver, "ntfy", "/backups")
    assert path == "/"
    assert body["topic"] == "backups" and body["priority"] == 5
    assert body["title"] == "[CRITICAL] box: A backup failed"
    assert body["tags"] == ["critical", "backup_failed"]
    assert "the folder /srv/docs does not exist" in body["message"]


def test_gotify_keeps_the_token_in_the_url_and_maps_the_priority(receiver: Any) -> None:
    path, _, body = post(receiver, "gotify", "/message?token=app-token")
    assert path == "/message?token=app-token"
    assert set(body) == {"title", "message", "priority"} and body["priority"] == 8


def test_slack_style_hooks_get_one_text(receiver: Any) -> None:
    path, _, body = post(receiver, "slack", "/services/T/B/X")
    assert path == "/services/T/B/X"
    assert list(body) == ["text"]
    assert body["text"].startswith("*[CRITICAL] box: A backup failed*\n")


def test_teams_gets_a_message_card_in_the_severity_colour(receiver: Any) -> None:
    _, _, body = post(receiver, "teams", "/webhookb2/x")
    assert body["@type"] == "MessageCard" and body["themeColor"] == "D13438"
    assert body["summary"] == body["title"] == "[CRITICAL] box: A backup failed"
    assert "<br>" in body["text"] and "\n" not in body["text"]


def test_generic_is_the_alert_itself(receiver: Any) -> None:
    _, _, body = post(receiver, "generic", "/hook")
    assert (body["id"], body["kind"], body["subject"], body["count"]) == (
        7,
        "backup_failed",
        "docs",
        1,
    )
    assert body["details"] == {"job": "j1"} and body["first_seen"] == T0.isoformat()
