"""Alert channels, the adapters at the edge: e-mail over SMTP and webhooks (JSON POST).

A channel is a catalog record (kind, name, settings without secrets) plus its secrets in
``<data>/secrets/alert-channel-<id>.json`` (0600, like a location's credentials): the SMTP
password, the webhook URL (its path or query is often the token) and the webhook's HMAC key. The
API never returns a secret; it says only whether one is set.

E-mail: ``security`` is ``starttls`` (the default: plain connect, then STARTTLS, required) or
``tls`` (TLS from the first byte, port 465). The server's certificate is verified against
``ca_file`` when given, else the system's store. There is no plain-text mode: a login and the
alert's contents never cross the network unencrypted.

Webhook presets shape the JSON body for the receiver: ``generic`` (the alert as JSON), ``ntfy``
(ntfy's JSON publish: posted to the server's root with the URL's last path part as the topic),
``gotify`` (``/message?token=...``), ``slack`` (``{"text": ...}``, also Mattermost and
Rocket.Chat) and ``teams`` (a MessageCard). With an HMAC key the body is signed:
``X-Appliance-Signature: sha256=<hex HMAC-SHA256 of the body>``.

Every failure becomes :class:`DeliveryFailed` with a sentence that says what went wrong ("the
SMTP server refused the login"); the caller records it on the alert.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import smtplib
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from appliance.alerts.events import EVENT_KINDS
from appliance.alerts.records import AlertChannelRecord, AlertRecord
from appliance.errors import ApplianceError, InvalidInput

PRESETS = ("generic", "ntfy", "gotify", "slack", "teams")
SMTP_SECURITY = ("starttls", "tls")
TIMEOUT = 15.0
#: What a webhook answer may be read to quote in an error.
ANSWER_QUOTE = 200
SECRET_FIELDS = {"email": ("password",), "webhook": ("url", "hmac_key")}
MAX_CA_FILE = 1 << 20


class DeliveryFailed(ApplianceError):
    """The alert could not be delivered to the channel."""

    code = "alert_delivery_failed"
    kind = "conflict"


# --- settings and secrets -----------------------------------------------------------------------


def secrets_path(secrets_dir: Path, channel_id: str) -> Path:
    return secrets_dir / f"alert-channel-{channel_id}.json"


def save_secrets(secrets_dir: Path, channel_id: str, secrets: Mapping[str, str]) -> None:
    secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = secrets_path(secrets_dir, channel_id)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(secrets), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_secrets(secrets_dir: Path, channel_id: str) -> dict[str, str]:
    try:
        loaded = json.loads(secrets_path(secrets_dir, channel_id).read_text())
    except FileNotFoundError:
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def delete_secrets(secrets_dir: Path, channel_id: str) -> None:
    secrets_path(secrets_dir, channel_id).unlink(missing_ok=True)


def check_url(url: str) -> str:
    """An http(s) URL with a host, or :class:`InvalidInput` (the service runs as root: a
    ``file:`` or other scheme must never be fetched)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("a webhook address must be an http:// or https:// URL with a host name")
    return urlunsplit(parts)


def check_ca_file(value: str) -> str:
    """An absolute path of a readable regular file of PEM certificates."""
    path = Path(value)
    if not path.is_absolute():
        raise InvalidInput("the CA file must be an absolute path", path=value)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(f"the CA file {value} cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > MAX_CA_FILE:
            raise InvalidInput(f"the CA file {value} is not a certificate file", path=value)
        pem = os.read(fd, MAX_CA_FILE).decode("ascii", "replace")
    finally:
        os.close(fd)
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError):
        raise InvalidInput(f"the CA file {value} holds no PEM certificate", path=value) from None
    return str(path)


def _text(settings: Mapping[str, Any], key: str, default: str = "") -> str:
    value = settings.get(key, default)
    if not isinstance(value, str):
        raise InvalidInput(f"channel setting {key!r} must be text")
    return value.strip()


def check_settings(kind: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The channel's non-secret settings, validated and normalised."""
    if kind == "email":
        known = {"host", "port", "security", "username", "sender", "recipients", "ca_file"}
        unknown = set(settings) - known
        if unknown:
            raise InvalidInput(f"unknown e-mail setting(s): {', '.join(sorted(unknown))}")
        host = _text(settings, "host")
        if not host:
            raise InvalidInput("an e-mail channel needs the SMTP server's host name")
        security = _text(settings, "security", "starttls")
        if security not in SMTP_SECURITY:
            raise InvalidInput(
                f"security must be one of {', '.join(SMTP_SECURITY)}: alerts are never sent "
                "without TLS"
            )
        port = settings.get("port", 465 if security == "tls" else 587)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise InvalidInput("the SMTP port must be a number from 1 to 65535")
        recipients = settings.get("recipients")
        if (
            not isinstance(recipients, list)
            or not recipients
            or not all(isinstance(r, str) and "@" in r for r in recipients)
        ):
            raise InvalidInput("an e-mail channel needs at least one recipient address")
        sender = _text(settings, "sender")
        if "@" not in sender:
            raise InvalidInput("an e-mail channel needs a sender address")
        ca_file = _text(settings, "ca_file")
        return {
            "host": host,
            "port": port,
            "security": security,
            "username": _text(settings, "username"),
            "sender": sender,
            "recipients": [r.strip() for r in recipients],
            "ca_file": check_ca_file(ca_file) if ca_file else "",
        }
    if kind == "webhook":
        unknown = set(settings) - {"preset", "timeout"}
        if unknown:
            raise InvalidInput(f"unknown webhook setting(s): {', '.join(sorted(unknown))}")
        preset = _text(settings, "preset", "generic")
        if preset not in PRESETS:
            raise InvalidInput(f"the webhook preset must be one of {', '.join(PRESETS)}")
        timeout = settings.get("timeout", TIMEOUT)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout <= 60
        ):
            raise InvalidInput("the webhook timeout is a number of seconds from 1 to 60")
        return {"preset": preset, "timeout": float(timeout)}
    raise InvalidInput(f"channel kind {kind!r} is not one of email, webhook")


def check_secrets(kind: str, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
    """Refuse what a channel cannot work without (a webhook's URL; a password for a login)."""
    if kind == "webhook":
        if not secrets.get("url"):
            raise InvalidInput("a webhook channel needs the address to post to")
        check_url(secrets["url"])
    if kind == "email" and settings.get("username") and not secrets.get("password"):
        raise InvalidInput("a login name is set but no password")


# --- composing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    title: str
    body: str


def compose(alert: AlertRecord, appliance_name: str) -> Message:
    kind = EVENT_KINDS.get(alert.kind)
    what = kind.title if kind else alert.kind
    title = f"[{alert.severity.upper()}] {appliance_name}: {what}"
    lines = [alert.message, "", f"Severity: {alert.severity}", f"About: {alert.subject}"]
    lines.append(f"First seen: {alert.first_seen.strftime('%Y-%m-%d %H:%M UTC')}")
    if alert.count > 1:
        lines.append(f"Seen {alert.count} times, last at {alert.last_seen:%Y-%m-%d %H:%M UTC}")
    lines += ["", "Acknowledge it on the appliance's Alerts page."]
    return Message(title, "\n".join(lines))


_PRIORITY = {"critical": (5, 8), "warning": (4, 5), "info": (3, 2)}  # (ntfy, gotify)
_COLOUR = {"critical": "D13438", "warning": "FFB900", "info": "0078D4"}


def webhook_request(
    preset: str, url: str, alert: AlertRecord, message: Message
) -> tuple[str, dict[str, Any]]:
    """(the URL to post to, the JSON body) for ``preset``: a pure function."""
    if preset == "ntfy":
        parts = urlsplit(url)
        topic = parts.path.strip("/").rsplit("/", 1)[-1]
        root = urlunsplit((parts.scheme, parts.netloc, "/", parts.query, ""))
        return root, {
            "topic": topic,
            "title": message.title,
            "message": message.body,
            "priority": _PRIORITY[alert.severity][0],
            "tags": [alert.severity, alert.kind],
        }
    if preset == "gotify":
        return url, {
            "title": message.title,
            "message": message.body,
            "priority": _PRIORITY[alert.severity][1],
        }
    if preset == "slack":
        return url, {"text": f"*{message.title}*\n{message.body}"}
    if preset == "teams":
        return url, {
            "@type": "MessageCard",
            "@context": "https://schema.org/extensions",
            "summary": message.title,
            "themeColor": _COLOUR[alert.severity],
            "title": message.title,
            "text": message.body.replace("\n", "<br>"),
        }
    return url, {
        "id": alert.id,
        "kind": alert.kind,
        "severity": alert.severity,
        "subject": alert.subject,
        "title": message.title,
        "message": alert.message,
        "details": alert.details,
        "first_seen": alert.first_seen.isoformat(),
        "last_seen": alert.last_seen.isoformat(),
        "count": alert.count,
    }


def signature(key: str, body: bytes) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


# --- sending ------------------------------------------------------------------------------------


def _tls_context(ca_file: str) -> ssl.SSLContext:
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    return ssl.create_default_context()


def send_email(settings: Mapping[str, Any], secrets: Mapping[str, str], message: Message) -> None:
    host, port = str(settings["host"]), int(settings["port"])
    where = f"{host}:{port}"
    mail = EmailMessage()
    mail["From"] = str(settings["sender"])
    mail["To"] = ", ".join(settings["recipients"])
    mail["Subject"] = message.title
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain=str(settings["sender"]).rsplit("@", 1)[-1])
    mail.set_content(message.body)
    try:
        context = _tls_context(str(settings.get("ca_file") or ""))
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryFailed(f"The CA file cannot be used: {exc}") from None
    try:
        smtp: smtplib.SMTP
        if settings.get("security") == "tls":
            smtp = smtplib.SMTP_SSL(host, port, timeout=TIMEOUT, context=context)
        else:
            smtp = smtplib.SMTP(host, port, timeout=TIMEOUT)
        with smtp:
            smtp.ehlo()
            if settings.get("security") != "tls":
                if not smtp.has_extn("starttls"):
                    raise DeliveryFailed(
                        f"The SMTP server {where} does not offer STARTTLS; the appliance sends "
                        "mail only over TLS"
                    )
                smtp.starttls(context=context)
                smtp.ehlo()
            if settings.get("username"):
                smtp.login(str(settings["username"]), secrets.get("password", ""))
            smtp.send_message(mail)
    except DeliveryFailed:
        raise
    except smtplib.SMTPAuthenticationError as exc:
        raise DeliveryFailed(
            f"SMTP server refused the login ({exc.smtp_code}): check the user name and password"
        ) from None
    except smtplib.SMTPNotSupportedError:
        raise DeliveryFailed(f"The SMTP server {where} does not accept a login") from None
    except smtplib.SMTPRecipientsRefused as exc:
        refused = ", ".join(sorted(exc.recipients))
        raise DeliveryFailed(f"The SMTP server refused the recipients {refused}") from None
    except smtplib.SMTPSenderRefused as exc:
        raise DeliveryFailed(f"The SMTP server refused the sender {exc.sender}") from None
    except ssl.SSLCertVerificationError as exc:
        raise DeliveryFailed(
            f"The certificate of the SMTP server {where} could not be verified: "
            f"{exc.verify_message}"
        ) from None
    except ssl.SSLError as exc:
        raise DeliveryFailed(f"TLS with the SMTP server {where} failed: {exc.reason}") from None
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else ""
        raise DeliveryFailed(f"The SMTP server answered {exc.smtp_code} {text}".strip()) from None
    except (smtplib.SMTPException, OSError) as exc:
        reason = "it did not answer in time" if isinstance(exc, socket.timeout) else str(exc)
        raise DeliveryFailed(f"Could not talk to the SMTP server {where}: {reason}") from None


def send_webhook(
    settings: Mapping[str, Any], secrets: Mapping[str, str], alert: AlertRecord, message: Message
) -> None:
    url = check_url(secrets.get("url", ""))
    target, document = webhook_request(str(settings.get("preset", "generic")), url, alert, message)
    body = json.dumps(document).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "backup-appliance-alerts"}
    if secrets.get("hmac_key"):
        headers["X-Appliance-Signature"] = signature(secrets["hmac_key"], body)
    request = urllib.request.Request(target, data=body, headers=headers, method="POST")
    host = urlsplit(target).netloc
    try:
        # urllib follows redirects only to http(s); the scheme was checked above.
        with urllib.request.urlopen(
            request, timeout=float(settings.get("timeout", TIMEOUT))
        ) as answer:
            answer.read(ANSWER_QUOTE)
    except urllib.error.HTTPError as exc:
        quote = exc.read(ANSWER_QUOTE).decode(errors="replace").strip()
        raise DeliveryFailed(
            f"The webhook at {host} answered HTTP {exc.code}" + (f": {quote}" if quote else "")
        ) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            text = f"its certificate could not be verified: {reason.verify_message}"
        elif isinstance(reason, OSError) and reason.strerror:
            text = reason.strerror.lower()
        else:
            text = str(reason)
        raise DeliveryFailed(f"Could not reach the webhook at {host}: {text}") from None
    except (OSError, ValueError) as exc:
        reason = "it did not answer in time" if isinstance(exc, socket.timeout) else str(exc)
        raise DeliveryFailed(f"Could not reach the webhook at {host}: {reason}") from None


def deliver(
    channel: AlertChannelRecord,
    secrets: Mapping[str, str],
    alert: AlertRecord,
    appliance_name: str,
) -> None:
    """Send ``alert`` on ``channel``; :class:`DeliveryFailed` says why it did not arrive."""
    message = compose(alert, appliance_name)
    if channel.kind == "email":
        send_email(channel.settings, secrets, message)
    elif channel.kind == "webhook":
        send_webhook(channel.settings, secrets, alert, message)
    else:
        raise DeliveryFailed(f"unknown channel kind {channel.kind}")


def send_text(
    channel: AlertChannelRecord, secrets: Mapping[str, str], alert: AlertRecord, title: str
) -> None:
    """Send a composed text (the summary mail) with ``alert`` standing for its metadata."""
    message = Message(title, alert.message)
    if channel.kind == "email":
        send_email(channel.settings, secrets, message)
    else:
        send_webhook(channel.settings, secrets, alert, message)
