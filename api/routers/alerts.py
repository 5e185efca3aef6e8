"""Alerts, their channels and rules (docs/alerts.md).

Anyone signed in sees the alerts; an operator or admin acknowledges one (audited). Channels,
rules and the summary mail are the admin's. A channel's secrets (SMTP password, webhook URL,
HMAC key) are write-only: kept in ``<data>/secrets`` (0600), never in an answer or the audit log.
"send test alert" sends to one channel now and answers with the exact failure when it fails.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Query, Response, status

from api.alert_channels import (
    SECRET_FIELDS,
    check_secrets,
    check_settings,
    check_url,
    delete_secrets,
    load_secrets,
    save_secrets,
)
from api.alerting import AlertService
from api.deps import Admin, Operator, ServiceDep, Viewer
from api.schemas_alerts import (
    AlertCounts,
    AlertPublic,
    ChannelCreate,
    ChannelPublic,
    ChannelTestResult,
    ChannelUpdate,
    DeliveryPublic,
    RulePublic,
    RuleUpdate,
    SummaryPublic,
)
from api.service import Service
from appliance.alerts.events import EVENT_KINDS, SEVERITIES
from appliance.alerts.records import AlertChannelRecord, AlertRecord
from appliance.alerts.rules import parse_rule
from appliance.alerts.summary import parse_summary
from appliance.errors import InvalidInput

#: An alert's id in a path: a catalog integer, bounded like every integer a request carries.
AlertId = Annotated[int, Path(ge=1, le=2**63 - 1)]

router = APIRouter(tags=["alerts"])

SUMMARY_KEY = "alert_summary"


def _alerts(service: Service) -> AlertService:
    if service.alerts is None:
        raise RuntimeError("the service is not running")
    return service.alerts


def alert_public(alert: AlertRecord, names: dict[str, str]) -> AlertPublic:
    kind = EVENT_KINDS.get(alert.kind)
    return AlertPublic(
        id=alert.id,
        kind=alert.kind,
        title=kind.title if kind else alert.kind,
        severity=alert.severity,
        subject=alert.subject,
        message=alert.message,
        details=alert.details,
        state=alert.state,
        first_seen=alert.first_seen,
        last_seen=alert.last_seen,
        count=alert.count,
        last_sent_at=alert.last_sent_at,
        acknowledged_by=alert.acknowledged_by,
        acknowledged_at=alert.acknowledged_at,
        resolved_at=alert.resolved_at,
        delivery=[
            DeliveryPublic(
                channel_id=channel_id,
                channel=names.get(channel_id, outcome.get("channel")),
                state=str(outcome.get("state", "failed")),
                attempts=int(outcome.get("attempts", 0)),
                at=outcome.get("at"),
                error=outcome.get("error"),
                next_retry=outcome.get("next_retry"),
            )
            for channel_id, outcome in sorted(alert.delivery.items())
        ],
    )


def _channel_names(service: Service) -> dict[str, str]:
    return {c.id: c.name for c in service.app.catalog.list_alert_channels()}


@router.get("/alerts", response_model=list[AlertPublic])
def list_alerts(
    principal: Viewer,
    service: ServiceDep,
    state: Annotated[str | None, Query(pattern="^(open|acknowledged|resolved)$")] = None,
    severity: Annotated[str | None, Query(pattern="^(critical|warning|info)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[AlertPublic]:
    """Newest first; ``state``: open (not acknowledged), acknowledged or resolved."""
    names = _channel_names(service)
    found = service.app.catalog.list_alerts(state, severity, limit)
    return [alert_public(a, names) for a in found]


@router.get("/alerts/counts", response_model=AlertCounts)
def alert_counts(principal: Viewer, service: ServiceDep) -> AlertCounts:
    counts = service.app.catalog.count_open_alerts()
    return AlertCounts(total=sum(counts.values()), **{s: counts.get(s, 0) for s in SEVERITIES})


@router.post("/alerts/{alert_id}/acknowledge", response_model=AlertPublic)
def acknowledge(alert_id: AlertId, principal: Operator, service: ServiceDep) -> AlertPublic:
    """Mark the alert seen: it stays until its condition ends, but is not sent again."""
    catalog = service.app.catalog
    alert = catalog.acknowledge_alert(alert_id, principal.name)
    catalog.audit(
        principal.name,
        "alert.acknowledge",
        str(alert_id),
        {"kind": alert.kind, "subject": alert.subject},
    )
    return alert_public(alert, _channel_names(service))


@router.post("/alerts/{alert_id}/resolve", response_model=AlertPublic)
def resolve(alert_id: AlertId, principal: Operator, service: ServiceDep) -> AlertPublic:
    """Close the alert by hand (its cause was dealt with); a condition that still holds is
    raised again as a new alert."""
    catalog = service.app.catalog
    alert = catalog.resolve_alert(alert_id, service.now())
    catalog.audit(
        principal.name,
        "alert.resolve",
        str(alert_id),
        {"kind": alert.kind, "subject": alert.subject},
    )
    return alert_public(alert, _channel_names(service))


# --- channels -----------------------------------------------------------------------------------


def channel_public(channel: AlertChannelRecord, secrets: dict[str, str]) -> ChannelPublic:
    url = secrets.get("url")
    return ChannelPublic(
        id=channel.id,
        name=channel.name,
        kind=channel.kind,
        enabled=channel.enabled,
        settings=channel.settings,
        secrets_set=sorted(k for k, v in secrets.items() if v),
        url_host=urlsplit(url).hostname if url else None,
        created_at=channel.created_at,
    )


def _settings_of(kind: str, body: ChannelCreate | ChannelUpdate) -> dict[str, Any] | None:
    part = body.email if kind == "email" else body.webhook
    if part is None:
        return None
    return check_settings(kind, part.model_dump(exclude_none=True))


def _secrets_of(body: ChannelCreate | ChannelUpdate, kind: str) -> dict[str, str]:
    given = {}
    for name in SECRET_FIELDS[kind]:
        value = getattr(body, name)
        if value is not None:
            given[name] = value.get_secret_value().strip()
    if given.get("url"):
        given["url"] = check_url(given["url"])
    return given


@router.get("/alert-channels", response_model=list[ChannelPublic])
def list_channels(principal: Admin, service: ServiceDep) -> list[ChannelPublic]:
    secrets_dir = service.settings.secrets_dir
    return [
        channel_public(c, load_secrets(secrets_dir, c.id))
        for c in service.app.catalog.list_alert_channels()
    ]


@router.post("/alert-channels", response_model=ChannelPublic, status_code=status.HTTP_201_CREATED)
def create_channel(body: ChannelCreate, principal: Admin, service: ServiceDep) -> ChannelPublic:
    settings = _settings_of(body.kind, body)
    if settings is None:
        raise InvalidInput(f"a {body.kind} channel needs its '{body.kind}' settings")
    secrets = _secrets_of(body, body.kind)
    check_secrets(body.kind, settings, secrets)
    catalog = service.app.catalog
    channel = catalog.add_alert_channel(body.name, body.kind, settings, enabled=body.enabled)
    save_secrets(service.settings.secrets_dir, channel.id, secrets)
    catalog.audit(
        principal.name,
        "alert_channel.create",
        channel.name,
        {"kind": channel.kind, "enabled": channel.enabled},
    )
    return channel_public(channel, secrets)


@router.patch("/alert-channels/{channel_id}", response_model=ChannelPublic)
def update_channel(
    channel_id: str, body: ChannelUpdate, principal: Admin, service: ServiceDep
) -> ChannelPublic:
    catalog = service.app.catalog
    current = catalog.get_alert_channel(channel_id)
    settings = _settings_of(current.kind, body)
    secrets_dir = service.settings.secrets_dir
    secrets = {**load_secrets(secrets_dir, channel_id), **_secrets_of(body, current.kind)}
    secrets = {k: v for k, v in secrets.items() if v}
    check_secrets(current.kind, settings or current.settings, secrets)
    channel = catalog.update_alert_channel(
        channel_id, name=body.name, enabled=body.enabled, settings=settings
    )
    save_secrets(secrets_dir, channel_id, secrets)
    changed = [f for f in ("name", "enabled", "email", "webhook") if getattr(body, f) is not None]
    changed += [f for f in ("password", "url", "hmac_key") if getattr(body, f) is not None]
    catalog.audit(principal.name, "alert_channel.update", channel.name, {"changed": changed})
    return channel_public(channel, secrets)


@router.delete("/alert-channels/{channel_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_channel(channel_id: str, principal: Admin, service: ServiceDep) -> Response:
    catalog = service.app.catalog
    channel = catalog.get_alert_channel(channel_id)
    catalog.delete_alert_channel(channel_id)
    delete_secrets(service.settings.secrets_dir, channel_id)
    catalog.audit(principal.name, "alert_channel.delete", channel.name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/alert-channels/{channel_id}/test", response_model=ChannelTestResult)
def test_channel(channel_id: str, principal: Admin, service: ServiceDep) -> ChannelTestResult:
    """Send a test alert to this channel now; ``ok`` false carries the reason in words."""
    outcome = _alerts(service).send_test(channel_id, principal.name)
    service.app.catalog.audit(
        principal.name, "alert_channel.test", channel_id, {"ok": outcome["ok"]}
    )
    return ChannelTestResult(**outcome)


# --- rules and the summary --------------------------------------------------------------------------


def _rules(service: Service) -> list[RulePublic]:
    rules = _alerts(service).rules()
    return [
        RulePublic(
            kind=kind.name,
            title=kind.title,
            enabled=rules[kind.name].enabled,
            severity=rules[kind.name].severity,  # type: ignore[arg-type]
            channels=list(rules[kind.name].channels),
            repeat_seconds=rules[kind.name].repeat_seconds,
            default_severity=kind.severity,  # type: ignore[arg-type]
        )
        for kind in EVENT_KINDS.values()
    ]


@router.get("/alert-rules", response_model=list[RulePublic])
def get_rules(principal: Admin, service: ServiceDep) -> list[RulePublic]:
    """A rule for every event kind (its default where none was set)."""
    return _rules(service)


@router.put("/alert-rules", response_model=list[RulePublic])
def put_rules(body: list[RuleUpdate], principal: Admin, service: ServiceDep) -> list[RulePublic]:
    """Set the rules of the kinds listed (the others keep theirs)."""
    catalog = service.app.catalog
    channels = {c.id for c in catalog.list_alert_channels()}
    stored = catalog.alert_rules()
    for update in body:
        document = update.model_dump(exclude={"kind"})
        rule = parse_rule(update.kind, document)
        unknown = set(rule.channels) - channels
        if unknown:
            raise InvalidInput(
                f"unknown alert channel(s): {', '.join(sorted(unknown))}", kind=update.kind
            )
        stored[update.kind] = rule.to_dict() | {"kind": update.kind}
    catalog.put_alert_rules(
        {k: {f: v for f, v in r.items() if f != "kind"} for k, r in stored.items()}
    )
    catalog.audit(principal.name, "alert_rules.update", "rules", {"kinds": [u.kind for u in body]})
    return _rules(service)


@router.get("/alert-summary", response_model=SummaryPublic)
def get_summary(principal: Admin, service: ServiceDep) -> SummaryPublic:
    settings = parse_summary(service.app.catalog.get_settings(SUMMARY_KEY))
    return SummaryPublic(**settings.to_dict())


@router.put("/alert-summary", response_model=SummaryPublic)
def put_summary(body: SummaryPublic, principal: Admin, service: ServiceDep) -> SummaryPublic:
    settings = parse_summary(body.model_dump())
    catalog = service.app.catalog
    catalog.put_settings(SUMMARY_KEY, settings.to_dict())
    catalog.audit(principal.name, "alert_summary.update", "summary", settings.to_dict())
    return SummaryPublic(**settings.to_dict())
